// The per-channel setup of the channels-last backward (bn_act_kernel.inc), before (old: scalar,
// two square roots and divisions per channel plus the weight gradient's third) and after (new:
// double vectors, one square root and division per channel), timed alone. Build and run:
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")/include
//   g++ -O3 -std=c++17 -mavx2 -mfma -DCPU_CAPABILITY_AVX2 -DCPU_CAPABILITY=AVX2 -I$T \
//       -include functional docs/cpu/2026-12-02-channel-setup-vector.cpp -o /tmp/mb && /tmp/mb
#include <ATen/cpu/vec/vec.h>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>
using DVec = at::vec::Vectorized<double>;
int main() {
  for (int C : {256, 512, 1024, 2048}) {
    std::vector<double> mean(C), var(C), w(C), b(C), sg(C), sgx(C), inv(C), gw(C), d(C);
    std::vector<float> sc(C), sh(C), k1(C), k2(C), mg(C);
    for (int c = 0; c < C; ++c) mean[c] = 0.1 * c, var[c] = 1 + 0.01 * c, w[c] = 1, b[c] = 0.5, sg[c] = c, sgx[c] = 2 * c;
    const double eps = 1e-5, n = 98;
    auto old_ = [&] {
      for (int c = 0; c < C; ++c) {
        double is = 1.0 / std::sqrt(var[c] + eps), s = w[c] * is;
        sc[c] = s; sh[c] = b[c] - mean[c] * s;
        inv[c] = 1.0 / std::sqrt(var[c] + eps);
        k1[c] = w[c] * inv[c];
      }
      for (int c = 0; c < C; ++c) { mg[c] = sg[c] / n; k2[c] = inv[c] * inv[c] * sgx[c] / n; }
      for (int c = 0; c < C; ++c) gw[c] = sgx[c] / std::sqrt(var[c] + eps);
    };
    auto new_ = [&] {
      const DVec one(1.0), veps(eps), vn(n);
      double s[4], t[4], u[4], v[4];
      for (int c = 0; c < C; c += 4) {
        int k = std::min(4, C - c);
        DVec vm = DVec::loadu(&mean[c], k), vv = DVec::loadu(&var[c], k), vw = DVec::loadu(&w[c], k), vb = DVec::loadu(&b[c], k);
        DVec i = one / (vv + veps).sqrt(), scv = vw * i;
        at::vec::fmadd(vm.neg(), scv, vb).store(t); scv.store(s);
        for (int l = 0; l < k; ++l) sc[c + l] = s[l], sh[c + l] = t[l];
        i.store(&inv[c], k);
      }
      for (int c = 0; c < C; c += 4) {
        int k = std::min(4, C - c);
        DVec i = DVec::loadu(&inv[c], k), x = DVec::loadu(&sgx[c], k);
        (x * i).store(&gw[c], k);
        (DVec::loadu(&sg[c], k) / vn).store(u); (i * i * x / vn).store(v);
        for (int l = 0; l < k; ++l) mg[c + l] = u[l], k2[c + l] = v[l];
      }
    };
    for (int rep = 0; rep < 2; ++rep)
    for (auto [name, f] : {std::pair<const char*, std::function<void()>>{"old", old_}, {"new", new_}}) {
      double best = 1e9;
      for (int r = 0; r < 2000; ++r) {
        auto t0 = std::chrono::steady_clock::now(); f();
        best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      printf("C=%d %s backward setup: %.2f us (min of 2000)\n", C, name, best);
    }
  }
}
