"""Throughput on a GPU: SD 1.5 at 512 px and SDXL at 1024 px (published architectures, random
weights: nothing downloaded), in one run, one table, also written as JSON.

    python benchmarks/gpu.py                                    # on a GPU machine
    python benchmarks/gpu.py --device cpu --size 64 --families sd15 --steps 2 --batch 2 --repeats 1

Rows per family, each timed over ``--repeats`` after one warm-up:
* bare diffusers sampling (``pipe(...)``, DDIM with eta 1) and Armature's rollout with per-step
  log-probs (``DiffusionPolicy.rollout``), images/s, and their ratio (rollout / bare);
* learner throughput through the learners' DeepSpeed ZeRO-2 engine (``armature.platform.engine``):
  DDPO transitions/s (one optimizer step over every stored step of a rollout batch) and
  Diffusion-DPO pairs/s (``--steps`` micro-batches of ``--batch // 2`` pairs a step), each with
  LoRA on the family's default targets and with full fine-tuning (the DPO reference: a frozen copy);
* peak memory of each row (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS);
* model FLOPs utilisation: the FLOPs of one iteration, counted by ``torch.utils.flop_counter``
  (matmuls and convolutions of every network in it, backward included) over the time of one
  iteration, against the device's dense peak (the table ``PEAK_TFLOPS``, or ``--peak-tflops``).

Weights are float32, with TF32 matmuls on the GPU (MFU is against the TF32 dense peak). A full
fine-tuning row whose estimated memory (16 bytes a parameter, 4 more for DPO's frozen reference)
exceeds ``--memory-gb`` is skipped and says so (default: the GPU's memory; 8 GiB on CPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import socket
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from architectures import PROMPT, advantages, dpo_loss, policy_gradient_losses, rewards_of  # noqa: E402

NATIVE = {"sd15": 512, "sdxl": 1024}
# dense TF32 tensor-core peaks from NVIDIA's datasheets (SXM parts), TFLOPS
PEAK_TFLOPS = {"H200": 494.7, "H100": 494.7, "A100": 156.0, "L40S": 183.0}
ALGO = {
    "learning_rate": 1e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-4,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
}


class Device:
    """The device's name, its peak, its memory and how to read and reset its peak memory."""

    def __init__(self, name: str, peak_tflops: float | None, memory_gb: float | None):
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self.name = torch.cuda.get_device_name(self.torch)
            total = torch.cuda.get_device_properties(self.torch).total_memory / 2**30
            stated = next((v for k, v in PEAK_TFLOPS.items() if k in self.name), None)
        else:
            self.name, total, stated = f"CPU {platform.processor() or platform.machine()}", 8.0, None
        self.peak_tflops = peak_tflops or stated
        self.peak_source = "--peak-tflops" if peak_tflops else ("datasheet, TF32 dense" if stated else "not stated")
        self.memory_gb = memory_gb or total

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.torch) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)


def measure(device: Device, fn, units: float, repeats: int) -> dict:
    """Warm up once under a FLOP counter, then time ``repeats`` calls: units/s, FLOPs, MFU, memory."""
    from torch.utils.flop_counter import FlopCounterMode

    device.reset_peak()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    device.sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    device.sync()
    seconds = (time.perf_counter() - start) / repeats
    flops = counter.get_total_flops()
    mfu = flops / seconds / (device.peak_tflops * 1e12) if device.peak_tflops else None
    return {
        "per_s": units / seconds,
        "s_per_iter": seconds,
        "tflop_per_iter": flops / 1e12,
        "mfu": mfu,
        "peak_mem_gb": device.peak_gb(),
    }


def init_single_process_group(device: Device) -> None:
    """DeepSpeed needs a process group: a one-process one, as a one-worker Ray Train run has."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.cuda else "gloo", rank=0, world_size=1)


def learner_rows(policy, traj, device: Device, args, mode: str, frozen=None) -> list[dict]:
    """DDPO and DPO through the learners' ZeRO-2 engine, gradients accumulated over ``args.steps``
    micro-batches a step (the DDPO job's accumulation over stored steps)."""
    from armature.platform.engine import deepspeed_engine

    engine, _, params = deepspeed_engine(
        policy, ALGO, {"zero_stage": 2}, accumulation=args.steps, micro_batch=args.batch
    )
    policy.denoiser = engine
    engine.train()
    adv = advantages(policy, rewards_of(traj.images))
    half = args.batch // 2
    x0 = traj.latents[:, -1]
    generator = torch.Generator().manual_seed(0)

    def ddpo():
        for loss in policy_gradient_losses(policy, traj, adv):
            engine.backward(loss)
            engine.step()

    def dpo():
        for _ in range(args.steps):
            loss = dpo_loss(policy, x0[:half], x0[half : 2 * half], [PROMPT] * half, generator, frozen)
            engine.backward(loss)
            engine.step()

    trainable = sum(p.numel() for p in params)
    rows = [
        {
            "row": f"DDPO {mode} (ZeRO-2)",
            "unit": "transitions/s",
            "trainable": trainable,
            **measure(device, ddpo, args.batch * args.steps, args.repeats),
        },
        {
            "row": f"DPO {mode} (ZeRO-2)",
            "unit": "pairs/s",
            "trainable": trainable,
            **measure(device, dpo, half * args.steps, args.repeats),
        },
    ]
    policy.denoiser = policy.unet
    return rows


def full_finetune_fits(params: int, device: Device) -> tuple[bool, float]:
    """Weights, gradients and AdamW's two moments in float32, and DPO's frozen reference copy."""
    need = params * (16 + 4) / 2**30
    return need <= 0.9 * device.memory_gb, need


def run_family(name: str, size: int, device: Device, args) -> list[dict]:
    from armature.policies import SamplingParams
    from armature.policies.architectures import architecture_policy, default_lora

    sampling = SamplingParams(num_steps=args.steps, guidance_scale=args.guidance, eta=1.0, height=size, width=size)
    prompts = [PROMPT] * args.batch

    def build():
        torch.manual_seed(0)
        return architecture_policy(name, sampling=sampling, device=str(device.torch))

    policy = build()
    policy.unet.eval()

    def bare():
        policy.pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            eta=1.0,
            height=size,
            width=size,
            generator=torch.Generator(device.torch).manual_seed(0),
            output_type="np",
        )

    def rollout():
        return policy.rollout(prompts, [torch.Generator(device.torch).manual_seed(i) for i in range(args.batch)])

    rows = [
        {"row": "bare diffusers sampling", "unit": "images/s", **measure(device, bare, args.batch, args.repeats)},
        {
            "row": "Armature rollout + log-probs",
            "unit": "images/s",
            **measure(device, rollout, args.batch, args.repeats),
        },
    ]
    rows[1]["ratio"] = rows[1]["per_s"] / rows[0]["per_s"]
    traj = rollout()
    denoiser_params = sum(p.numel() for p in policy.unet.parameters())
    policy.add_lora(default_lora(name))
    rows += learner_rows(policy, traj, device, args, "LoRA")
    del policy
    gc.collect()
    fits, need = full_finetune_fits(denoiser_params, device)
    if fits:
        policy = build()
        policy.enable_full_finetuning()
        frozen = copy.deepcopy(policy.unet).requires_grad_(False)
        rows += learner_rows(policy, traj, device, args, "full", frozen)
        del policy, frozen
        gc.collect()
    else:
        for algo in ("DDPO", "DPO"):
            rows.append(
                {
                    "row": f"{algo} full (ZeRO-2)",
                    "skipped": f"needs ~{need:.0f} GiB > 0.9 x {device.memory_gb:.0f} GiB (--memory-gb)",
                }
            )
    if device.cuda:
        torch.cuda.empty_cache()
    for r in rows:
        r.update(family=name, size=size)
    return rows


def print_table(rows: list[dict], device: Device, args) -> None:
    peak = f"{device.peak_tflops} TFLOPS ({device.peak_source})" if device.peak_tflops else "not stated: no MFU"
    print(
        f"\ndevice {device.name}; peak {peak}; float32 weights; {args.steps} steps, batch {args.batch}, "
        f"guidance {args.guidance}; {args.repeats} timed repeats after a warm-up"
    )
    head = ("family", "px", "row", "throughput", "ratio", "s/iter", "TFLOP/iter", "MFU", "peak mem GiB")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        if "skipped" in r:
            print(" | ".join([r["family"], str(r["size"]), r["row"], "skipped: " + r["skipped"]] + ["-"] * 5))
            continue
        print(
            " | ".join(
                [
                    r["family"],
                    str(r["size"]),
                    r["row"],
                    f"{r['per_s']:.3g} {r['unit']}",
                    f"{r['ratio']:.3f}" if "ratio" in r else "-",
                    f"{r['s_per_iter']:.3g}",
                    f"{r['tflop_per_iter']:.3g}",
                    f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
                    f"{r['peak_mem_gb']:.2f}",
                ]
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", nargs="+", default=list(NATIVE), choices=list(NATIVE))
    parser.add_argument("--size", type=int, help="image pixels for every family (default: each one's native)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="rollout images (DPO: batch // 2 pairs)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, if not in PEAK_TFLOPS")
    parser.add_argument("--memory-gb", type=float, help="memory a full fine-tuning row may take")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    parser.add_argument("--json", default="gpu_benchmark.json")
    args = parser.parse_args()
    if args.batch < 2:
        raise SystemExit("--batch must be >= 2: DPO pairs two rollout images")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = Device(args.device, args.peak_tflops, args.memory_gb)
    init_single_process_group(device)
    rows = []
    for name in args.families:
        try:
            rows += run_family(name, args.size or NATIVE[name], device, args)
        except Exception as err:  # noqa: BLE001 -- named in the table, the other family still runs
            rows.append(
                {
                    "family": name,
                    "size": args.size or NATIVE[name],
                    "row": "-",
                    "skipped": f"FAILED: {type(err).__name__}: {err}",
                }
            )
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, device, args)
    with open(args.json, "w") as f:
        json.dump(
            {
                "device": device.name,
                "peak_tflops": device.peak_tflops,
                "peak_source": device.peak_source,
                "steps": args.steps,
                "batch": args.batch,
                "guidance": args.guidance,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
