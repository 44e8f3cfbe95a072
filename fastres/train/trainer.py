"""The fastres-train loop: single process or torchrun/DDP, CPU or CUDA.

``train(args, data=None)`` runs a whole training described by ``args`` (the namespace built by
``fastres.train.cli``; see ``fastres-train --help``) and returns the final metrics. ``data`` may
be a ready ``fastres.data.DataBundle`` (or any object with ``train``, ``val``, ``num_classes``);
by default it is built with ``fastres.data.build_data(args.data, recipe=args.recipe, ...)``.
"""
import contextlib
import datetime
import math
import os
import random
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from . import checkpoint as ckpt_mod
from .checkpoint import CheckpointError
from .common import UsageError, cli_data_backend
from .metrics_log import MetricsLog
from .schedule import LRSchedule, resolve_milestones


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------
def dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _pick_device(spec: Optional[str], distributed: bool, local_rank: int) -> torch.device:
    if not spec or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if distributed and dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype=None, channels_last=False,
             criterion=None) -> Dict[str, float]:
    """Loss and top-1/top-5 error over ``loader`` (summed over all ranks when distributed)."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, err1, err5, n
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        loss = F.cross_entropy(out, y, reduction="sum")
        k = min(5, out.shape[1])
        topk = out.topk(k, dim=1).indices
        hit = topk == y[:, None]
        stats += torch.stack([loss.double(), (~hit[:, 0]).sum().double(),
                              (~hit.any(1)).sum().double(),
                              torch.tensor(float(y.numel()), dtype=torch.float64,
                                           device=device)])
    _all_reduce(stats)
    n = max(1.0, stats[3].item())
    return {"loss": stats[0].item() / n, "err": stats[1].item() / n,
            "top5_err": stats[2].item() / n, "n": int(stats[3].item())}


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _default_out(model_name: str) -> str:
    model_name = model_name.replace(":", "-")  # timm:NAME
    return os.path.join("runs", f"{model_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def _build_data(args):
    try:
        import fastres.data as fdata
    except ImportError as e:
        raise UsageError(f"fastres.data is not available ({e}); cannot build --data "
                         f"{args.data!r}") from None
    try:
        return fdata.build_data(args.data, recipe=args.recipe, seed=args.seed,
                                cache_dir=getattr(args, "cache_dir", None))
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, OSError) as e:
        raise UsageError(f"--data {args.data!r}: {e}") from None


def _pipeline_loaders(args, data, backend, device, batch, sampler, gen, drop_last, distributed,
                      rank, world, main):
    """Train and validation loaders of the cpu / gpu / dali image-folder pipelines: batches
    already on ``device``, in the model's input dtype, channels_last with --channels-last."""
    from fastres.data.loaders import make_loader
    amp = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    val_sampler = None
    if distributed:
        val_sampler = list(range(rank, len(data.val), world))
    common = dict(num_workers=args.workers, out_dtype=amp, channels_last=args.channels_last,
                  seed=args.seed, shard_id=rank, num_shards=world,
                  log=lambda msg: _log(main, msg))
    train = make_loader(data.train, backend, batch, device, mode="train", sampler=sampler,
                        drop_last=drop_last, generator=gen, **common)
    val = make_loader(data.val, backend, max(batch, 1), device, mode="center",
                      sampler=val_sampler, **common)
    _log(main, f"data backend: {backend} ({args.workers} workers)")
    return train, val


def _log(main: bool, *msg):
    if main:
        print(*msg, flush=True)


def train(args, data=None) -> Dict[str, Any]:
    world, rank, local_rank = dist_env()
    distributed = world > 1
    main = rank == 0
    device = _pick_device(args.device, distributed, local_rank)
    if distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    # --deterministic changes process-wide switches: put them back afterwards
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    finished = False
    try:
        result = _train(args, data, device, world, rank, main, distributed)
        finished = True
        return result
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]
        if distributed and dist.is_initialized() and not getattr(args, "_keep_pg", False):
            if finished:
                # every rank tears down together: a rank that destroyed its gloo group and
                # exited while rank 0 was still saving and plotting was seen to abort ("terminate
                # called without an active exception", torch 2.11). Only after a clean finish:
                # after an error the other ranks may never arrive.
                dist.barrier()
            dist.destroy_process_group()


def _train(args, data, device, world, rank, main, distributed) -> Dict[str, Any]:
    import fastres
    import fastres.models

    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)

    # ---- output directory (rank 0 decides, everyone agrees) --------------------------------
    out = args.out or _default_out(args.model)
    if distributed:
        obj = [out]
        dist.broadcast_object_list(obj, src=0)
        out = obj[0]
    args.out = out
    if main:
        os.makedirs(out, exist_ok=True)

    # ---- data ------------------------------------------------------------------------------
    if data is None:
        data = _build_data(args)
    num_classes = int(data.num_classes)
    global_batch = int(args.batch_size)
    if global_batch % world:
        raise UsageError(f"--batch-size {global_batch} is not divisible by the "
                         f"{world} processes")
    batch = global_batch // world
    gen = torch.Generator()
    shuffle = not getattr(args, "no_shuffle", False)
    if distributed:
        sampler = DistributedSampler(data.train, num_replicas=world, rank=rank,
                                     shuffle=shuffle, seed=args.seed, drop_last=True)
    else:
        sampler = RandomSampler(data.train, generator=gen) if shuffle else \
            SequentialSampler(data.train)
    n_train = len(sampler)
    if n_train == 0:
        raise UsageError(f"the training set of --data {args.data!r} is empty")
    drop_last = n_train >= batch
    pin = device.type == "cuda"
    data_backend = cli_data_backend(getattr(args, "data_backend", None), data.train, device)
    if data_backend == "reference":
        train_loader = DataLoader(data.train, batch_size=batch, sampler=sampler,
                                  num_workers=args.workers, pin_memory=pin,
                                  drop_last=drop_last, generator=gen, persistent_workers=False)
        val_set = data.val
        if distributed:
            val_set = Subset(val_set, list(range(rank, len(val_set), world)))
        val_loader = DataLoader(val_set, batch_size=max(batch, 1), shuffle=False,
                                num_workers=args.workers, pin_memory=pin)
    else:
        train_loader, val_loader = _pipeline_loaders(args, data, data_backend, device, batch,
                                                     sampler, gen, drop_last, distributed,
                                                     rank, world, main)
    steps_per_epoch = len(train_loader)
    if args.iterations:
        total_iters = int(args.iterations)
        epochs = math.ceil(total_iters / steps_per_epoch)
    else:
        epochs = int(args.epochs)
        total_iters = epochs * steps_per_epoch
    milestones = resolve_milestones(args.milestones or [], total_iters)

    # ---- model, optimizer, schedule ----------------------------------------------------------
    model = fastres.models.get_model(args.model, fused=args.fused, num_classes=num_classes)
    if distributed and args.sync_bn:
        model = fastres.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    lr = float(args.lr)
    if args.lr_scale_batch:
        lr = lr * global_batch / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    schedule = LRSchedule(lr, args.schedule, total_iters, milestones,
                          gamma=args.gamma, warmup_iters=args.warmup_iters,
                          warmup_lr=args.warmup_lr, warmup_until_error=args.warmup_until_error,
                          patience=args.patience)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = None
    if args.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    # ---- resume ------------------------------------------------------------------------------
    start_epoch, it, best_err, best_epoch = 0, 0, math.inf, -1
    resume_path = ckpt_mod.find_resume(args.resume, out)
    if args.resume and args.resume != "auto" and not os.path.exists(args.resume):
        raise CheckpointError(f"--resume: checkpoint {args.resume!r} does not exist")
    if resume_path:
        ck = ckpt_mod.load_checkpoint(resume_path)
        ckpt_mod.check_compatible(ck, resume_path, args.model, num_classes)
        ckpt_mod.load_model_state(model, ck["model"], resume_path)
        try:
            optimizer.load_state_dict(ck["optimizer"])
            schedule.load_state_dict(ck["scheduler"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {resume_path!r}: optimizer/scheduler state "
                                  f"does not fit this run: {e}") from None
        if ema is not None and ck.get("ema") is not None:
            ckpt_mod.load_model_state(ema, ck["ema"], resume_path, "EMA")
        if "rng" in ck:
            ckpt_mod.set_rng_state(ck["rng"])
        start_epoch, it = int(ck["epoch"]), int(ck["iteration"])
        best_err, best_epoch = float(ck.get("best_val_err", math.inf)), int(
            ck.get("best_epoch", -1))
        _log(main, f"resumed from {resume_path} at epoch {start_epoch}, iteration {it}")

    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    eval_net = torch.compile(model) if args.compile else model

    log = MetricsLog(out, resume_epoch=start_epoch) if main else None
    tb = None
    if args.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(out, "tb"))
        except (ImportError, ModuleNotFoundError) as e:
            print(f"--tensorboard: TensorBoard is not installed ({e}); continuing without "
                  f"it (pip install tensorboard)", file=sys.stderr, flush=True)

    _log(main, f"fastres-train: {args.model} ({'fused' if args.fused else 'unfused'}) on "
               f"{getattr(data, 'name', args.data)} ({len(data.train)} train / {len(data.val)} "
               f"val, {num_classes} classes), {device.type} x{world}, batch {global_batch}, lr "
               f"{lr:g}, {args.schedule} schedule, {total_iters} iterations = {epochs} epochs "
               f"of {steps_per_epoch}; output {out}")

    def save(epoch, is_best):
        if not main:
            return
        state = {
            "format": ckpt_mod.FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "iteration": it, "best_val_err": best_err,
            "best_epoch": best_epoch, "num_classes": num_classes,
            "rng": ckpt_mod.get_rng_state(),
            "data_loader": {"generator": gen.get_state(), "seed": int(args.seed),
                            "epoch": epoch},
            "args": ckpt_mod.plain({k: v for k, v in vars(args).items()
                                    if not k.startswith("_")}),
        }
        ckpt_mod.save_atomic(state, os.path.join(out, "last.pt"))
        if is_best:
            ckpt_mod.save_atomic(state, os.path.join(out, "best.pt"))

    # ---- loop --------------------------------------------------------------------------------
    from tqdm.auto import tqdm
    last = {}
    stop_after = getattr(args, "stop_after", None)
    t_run = time.time()
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        if it >= total_iters:
            break
        if stop_after is not None and epoch >= stop_after:
            _log(main, f"stopping after epoch {epoch} (--stop-after); resume with --resume")
            break
        gen.manual_seed(args.seed * 1000003 + epoch)  # data order/augmentation of this epoch
        if distributed:
            sampler.set_epoch(epoch)
        net.train()
        steps = min(steps_per_epoch, total_iters - it)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not main or args.quiet, dynamic_ncols=True)
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, wrong, n
        t0 = time.time()
        n_seen = 0
        for step, (x, y) in enumerate(train_loader):
            if step >= steps:
                break
            cur_lr = schedule.lr_at(it)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp_dtype):
                out_ = net(x)
                loss = criterion(out_.float(), y)
            if getattr(args, "_inject_nan_at", None) == it:
                loss = loss * float("nan")
            step_stats = torch.stack([loss.detach().double() * y.numel(),
                                      (out_.detach().argmax(1) != y).sum().double(),
                                      torch.tensor(float(y.numel()), dtype=torch.float64,
                                                   device=device)])
            if distributed:
                _all_reduce(step_stats)
            if not math.isfinite(step_stats[0].item()):
                if bar is not None:
                    bar.close()
                raise TrainingDiverged(
                    f"loss is {step_stats[0].item() / step_stats[2].item()} at iteration {it} "
                    f"(epoch {epoch + 1}, lr {cur_lr:g}): training diverged; lower --lr, use "
                    f"--warmup-iters/--warmup-until-error or --clip-grad. The last good "
                    f"checkpoint is kept in {os.path.join(out, 'last.pt')}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            it += 1
            stats += step_stats
            n_seen += int(step_stats[2].item())
            run_err = stats[1].item() / stats[2].item()
            schedule.observe_train_error(run_err)
            if main and not args.quiet:
                ips = n_seen / max(1e-9, time.time() - t0)
                bar.set_postfix(loss=f"{stats[0].item() / stats[2].item():.3f}",
                                acc=f"{100 * (1 - run_err):.1f}%", lr=f"{cur_lr:.3g}",
                                img_s=f"{ips:.0f}", refresh=False)
                bar.update(1)
        bar.close()
        train_time = time.time() - t0
        if main and hasattr(train_loader, "stats"):
            ds = train_loader.stats()
            if ds.get("fallback") or ds.get("skipped") or ds.get("pipeline_peak_bytes"):
                print("data pipeline: " + ", ".join(f"{k} {v}" for k, v in ds.items()),
                      flush=True)
        tr_loss = stats[0].item() / max(1.0, stats[2].item())
        tr_err = stats[1].item() / max(1.0, stats[2].item())
        v = evaluate(eval_net, val_loader, device, amp_dtype, args.channels_last)
        ema_err = None
        if ema is not None:
            ema_err = evaluate(ema.module, val_loader, device, amp_dtype,
                               args.channels_last)["err"]
        schedule.step_epoch(v["err"])
        is_best = v["err"] < best_err
        if is_best:
            best_err, best_epoch = v["err"], epoch + 1
        row = {"epoch": epoch + 1, "iteration": it, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": tr_loss, "train_err": tr_err, "val_loss": v["loss"],
               "val_err": v["err"], "val_top5_err": v["top5_err"], "ema_val_err": ema_err,
               "images_per_s": n_seen / max(1e-9, train_time),
               "epoch_time": time.time() - t0, "time": time.time() - t_run}
        last = row
        if main:
            log.append(row)
            if tb is not None:
                for k in ("train_loss", "train_err", "val_loss", "val_err", "lr"):
                    tb.add_scalar(k, row[k], it)
            print(f"epoch {epoch + 1}/{epochs} it {it}: train loss {tr_loss:.4f} err "
                  f"{100 * tr_err:.2f}% | val loss {v['loss']:.4f} top-1 err "
                  f"{100 * v['err']:.2f}% top-5 err {100 * v['top5_err']:.2f}%"
                  + (f" (EMA {100 * ema_err:.2f}%)" if ema_err is not None else "")
                  + f" | {row['images_per_s']:.0f} img/s, {row['epoch_time']:.1f}s", flush=True)
        save(epoch + 1, is_best)
    if tb is not None:
        tb.close()
    if main and log is not None and log.rows:
        try:
            from .plot import plot_runs
            plot_runs([out], os.path.join(out, "curves.png"))
        except Exception as e:  # a plot must never fail a finished training
            print(f"warning: could not draw curves.png: {e}", file=sys.stderr)
    if main and not last and start_epoch >= epochs:
        print(f"nothing to do: the checkpoint is already at epoch {start_epoch} of {epochs} "
              f"(raise --epochs/--iterations to train further)", flush=True)
    result = {"out": out, "epochs": epochs, "iterations": it, "best_val_err": best_err,
              "best_epoch": best_epoch, **{k: v for k, v in last.items()}}
    if main and last:
        print(f"done: validation top-1 error {100 * last['val_err']:.2f}% (accuracy "
              f"{100 * (1 - last['val_err']):.2f}%), top-5 error "
              f"{100 * last['val_top5_err']:.2f}%; best top-1 error {100 * best_err:.2f}% "
              f"at epoch {best_epoch}; {time.time() - t_run:.0f}s; logs and checkpoints in "
              f"{out}", flush=True)
    return result
