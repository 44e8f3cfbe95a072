"""Bad input gives a clear error naming the problem."""
import pytest
import torch

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu


def args(c=4, shape=(2, 4, 3, 3)):
    return dict(x=torch.randn(shape), rm=torch.zeros(c), rv=torch.ones(c), w=torch.ones(c),
                b=torch.zeros(c))


def test_wrong_dimensionality():
    with pytest.raises(ValueError, match="at least 2 dims"):
        batch_norm_relu(torch.randn(5), None, None, training=True)


def test_channel_count_mismatch_names_the_tensor():
    a = args()
    with pytest.raises(ValueError, match="weight has shape \\(3,\\) but input has 4 channels"):
        batch_norm_relu(a["x"], a["rm"], a["rv"], torch.ones(3), a["b"], True)
    with pytest.raises(ValueError, match="running_var"):
        batch_norm_relu(a["x"], a["rm"], torch.ones(5), a["w"], a["b"], True)


def test_residual_of_another_shape():
    a = args()
    with pytest.raises(ValueError, match="residual shape"):
        batch_norm_add_relu(a["x"], torch.randn(2, 4, 3, 4), a["rm"], a["rv"], a["w"], a["b"], True)


def test_residual_dtype_and_missing_residual():
    a = args()
    with pytest.raises(TypeError, match="residual dtype"):
        batch_norm_add_relu(a["x"], a["x"].double(), a["rm"], a["rv"], a["w"], a["b"], True)
    with pytest.raises(ValueError, match="residual is required"):
        batch_norm_add_relu(a["x"], None, a["rm"], a["rv"], a["w"], a["b"], True)


def test_integer_input_and_bad_parameter_dtype():
    a = args()
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64"):
        batch_norm_relu(torch.ones(2, 4, 3, 3, dtype=torch.int32), a["rm"], a["rv"], training=True)
    with pytest.raises(TypeError, match="weight must be float32 or the input dtype"):
        batch_norm_relu(a["x"], a["rm"], a["rv"], a["w"].double(), a["b"], True)


def test_one_value_per_channel_when_training_matches_pytorch():
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_relu(x, torch.zeros(4), torch.ones(4), None, None, True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.functional.batch_norm(x, torch.zeros(4), torch.ones(4), None, None, True)
    # eval is fine with one value per channel, as in PyTorch
    batch_norm_relu(x, torch.zeros(4), torch.ones(4), None, None, False)


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="must be defined in evaluation mode"):
        batch_norm_relu(torch.randn(2, 4, 3, 3), None, None, None, None, False)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        batch_norm_relu(torch.randn(2, 4, 3, 3), torch.zeros(4), None, None, None, True)


def test_momentum_none_needs_counter():
    a = args()
    with pytest.raises(ValueError, match="num_batches_tracked"):
        batch_norm_relu(a["x"], a["rm"], a["rv"], a["w"], a["b"], True, None)


def test_device_mismatch_is_reported():
    a = args()
    meta_w = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        batch_norm_relu(a["x"], a["rm"], a["rv"], meta_w, a["b"], True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for two devices")
@pytest.mark.gpu
def test_cuda_cpu_mismatch():
    a = args()
    with pytest.raises(ValueError, match="is on cuda"):
        batch_norm_add_relu(a["x"], a["x"].cuda(), a["rm"], a["rv"], a["w"], a["b"], True)


def test_backend_for_the_wrong_device():
    a = args()
    if "cuda" in fastres.available_backends():
        pytest.skip("this machine has a GPU; covered by the GPU tests")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        fastres.set_backend("cuda")


def test_direct_op_call_is_checked_in_cpp():
    """torch.ops.fastres.* called directly (no Python checks) still refuses bad shapes."""
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fastres.bn_act_forward(x, None, torch.ones(3), None, None, None, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="residual shape"):
        torch.ops.fastres.bn_act_forward(x, torch.randn(2, 4, 3, 4), None, None, None, None,
                                         True, 1e-5, True)
    with pytest.raises(RuntimeError, match="running_mean and running_var are required"):
        torch.ops.fastres.bn_act_forward(x, None, None, None, None, None, False, 1e-5, True)
