"""The ``armature`` command.

armature train [overrides]          run a training job here (local Ray or RAY_ADDRESS)
armature submit train [overrides]   send it to a Ray cluster through the Jobs API
armature jobs list|status|logs|stop the submitted jobs
armature serve [overrides]          the image generator on Ray Serve (HTTP)
armature assets pose                fetch the pose reward's models once (MediaPipe BlazePose)
armature label serve|annotator|...  human feedback: the labeling page and the preference store
armature eval [overrides]           AER / RSI of policies on a prompt suite (no training)
armature gym check|pairs|pretrain|bench  the anatomy gym: oracle agreement, defect pairs,
                                    the base policy, learners + Best-of-N against the oracle
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """The algorithms (algo=<name>) are those registered in armature/jobs/ (armature.platform.algorithms).

examples:
  armature train                                  # the embedded default: DDPO on the tiny model
  armature train algo.num_epochs=50 trainer.num_workers=2
  armature train model=sd15 cluster=remote tracking=server
  armature train --cfg                            # print the composed config and exit
  armature submit train --address http://head:8265 tracking=server algo.num_epochs=50
  armature jobs list
"""


def _compose(config_name: str, overrides: list[str]):
    from armature.platform.config import ConfigError, compose

    try:
        return compose(config_name, overrides)
    except ConfigError as err:
        print(f"armature: {err}", file=sys.stderr)
        return None


def cmd_train(args) -> int:
    cfg = _compose("train", args.overrides)
    if cfg is None:
        return 2
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from armature.platform.algorithms import get

    algorithm = get(cfg.algo.name)
    metrics = algorithm.run(cfg)
    if metrics:
        print(f"[armature] done: epoch {int(metrics.get('epoch', -1)) + 1}, {algorithm.describe(metrics)}", flush=True)
    return 0


def cmd_eval(args) -> int:
    """`armature eval [overrides]`: the evaluation job (algo=eval), judged by the gym's oracle
    unless a reward= override says otherwise."""
    defaults = ["algo=eval"] + ([] if any(o.startswith("reward=") for o in args.overrides) else ["reward=gym_oracle"])
    args.overrides = defaults + list(args.overrides)
    return cmd_train(args)


def cmd_submit(args) -> int:
    from armature.platform.config import ConfigError
    from armature.platform.submit import submit, wait

    env = dict(item.split("=", 1) for item in args.env)
    try:
        info = submit(args.job, args.overrides, address=args.address, working_dir=args.working_dir, env=env)
    except (ConfigError, ValueError) as err:
        print(f"armature: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    if args.wait:
        status = wait(info["submission_id"], args.address)
        print(f"[armature] job {info['submission_id']}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args) -> int:
    from armature.platform.submit import client

    if args.action != "list" and not args.submission_id:
        print(f"armature: jobs {args.action} needs a submission id (see `armature jobs list`)", file=sys.stderr)
        return 2
    jobs = client(args.address)
    if args.action == "list":
        for job in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0):
            meta = job.metadata or {}
            print(
                f"{job.submission_id}\t{job.status.value}\t{meta.get('armature_job', '-')}\t"
                f"mlflow run {meta.get('mlflow_run_id', '-')}"
            )
        return 0
    if args.action == "status":
        info = jobs.get_job_info(args.submission_id)
        print(
            json.dumps(
                {
                    "submission_id": info.submission_id,
                    "status": info.status.value,
                    "message": info.message,
                    "entrypoint": info.entrypoint,
                    "metadata": info.metadata,
                },
                indent=2,
            )
        )
    elif args.action == "logs":
        print(jobs.get_job_logs(args.submission_id), end="")
    elif args.action == "stop":
        print("stopping" if jobs.stop_job(args.submission_id) else "already finished")
    return 0


def cmd_serve(args) -> int:
    cfg = _compose("serve", args.overrides)
    if cfg is None:
        return 2
    from armature.platform.config import ConfigError
    from armature.serve.app import check_rewards

    try:
        check_rewards(cfg)
    except ConfigError as err:
        print(f"armature: {err}", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    if args.cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from armature.serve.app import run, serve_config

    if args.serve_config:  # a Ray Serve config file for `serve deploy` / `serve run`
        print(OmegaConf.to_yaml(OmegaConf.create(serve_config(cfg, args.overrides))), end="")
        return 0
    run(cfg)
    return 0


def cmd_assets(args) -> int:
    from armature.rewards.assets import run

    return run(args)


def cmd_gym(args) -> int:
    from armature.gym import agreement, pairs

    if args.action == "pretrain":
        from armature.gym.base_policy import cache_path
        from armature.jobs.gym_pretrain import PretrainConfig, pretrain

        cfg = PretrainConfig(seed=args.seed, threads=args.threads)
        if args.minutes:
            cfg.time_budget_s = 60.0 * args.minutes
        stats = pretrain(cfg, args.out or cache_path(), log=lambda m: print(f"[armature] {m}", flush=True))
        return 0 if stats else 1
    if args.action == "bench":
        return cmd_gym_bench(args)
    if args.overrides:
        print(f"armature: gym {args.action} takes no Hydra overrides (got {args.overrides})", file=sys.stderr)
        return 2
    if args.action == "check":
        transform, what = None, "figures"
        if args.roundtrip:
            from armature.gym.base_policy import policy_path
            from armature.jobs.gym_pretrain import load_round_trip

            transform, what = load_round_trip(policy_path()), "figures after a round trip through the gym VAE"
        result = agreement(args.intact, args.per_kind, seed=args.seed, transform=transform)
        rates = ", ".join(f"{k} {v:.4f}" for k, v in result["by_kind"].items())
        print(f"[armature] oracle vs ground truth on {result['figures']} {what}: {result['agreement']:.4f} ({rates})")
        for mistake in result["mistakes"][:10]:
            print(f"  truth {mistake['truth']} found {mistake['found']}")
        return 0
    if not args.out:
        print("armature: gym pairs needs --out (a folder for the Parquet file)", file=sys.stderr)
        return 2
    from armature.data.pairs import write_pairs

    transform = None
    if args.roundtrip:
        from armature.gym.base_policy import policy_path
        from armature.jobs.gym_pretrain import load_round_trip

        transform = load_round_trip(policy_path())
    n = write_pairs(
        pairs(
            args.n or 600, seed=args.seed, transform=transform, crossed=args.crossed or 0.0, graded=args.graded or 0.0
        ),
        f"{args.out}/gym_pairs.parquet",
    )
    print(f"[armature] {n} gym pairs in {args.out}/gym_pairs.parquet")
    return 0


# `armature gym bench` is configured by the keys of configs/gym_bench.yaml; its former flags name
# the key that replaced them
BENCH_FLAGS = {
    "--out": "out=gym-bench",
    "--n": "pairs=8000",
    "--samples": "samples_per_prompt=16",
    "--best-of": "best_of=[1,4,8,16]",
    "--learners": "learners=[ddpo,dpo,asap_dpo]",
    "--reward-backbone": "reward_backbone=conv",
    "--crossed": "crossed=0.5",
    "--graded": "graded=0.75",
    "--reward-seeds": "reward_seeds=5",
    "--shared-pairs": "shared_pairs=true",
    "--drawn": "pair_domain=drawn",
    "--seed": "seed=0",
}


def cmd_gym_bench(args) -> int:
    """`armature gym bench`: configs/gym_bench.yaml composed with the overrides of its keys; the
    other overrides go to every stage."""
    from omegaconf import OmegaConf

    from armature.jobs.gym_bench import register_schema, run, split_overrides

    own, stages = split_overrides(list(args.overrides))
    register_schema()
    cfg = _compose("gym_bench", own)
    if cfg is None:
        return 2
    bench = OmegaConf.to_object(cfg)
    bench.overrides = list(bench.overrides) + stages
    run(bench, log=lambda m: print(f"[armature] {m}", flush=True))
    return 0


def bench_flag_errors(argv: list[str]) -> list[str]:
    """The former flags of `armature gym bench` in ``argv``, each with the key that replaced it."""
    if argv[:2] != ["gym", "bench"]:
        return []
    used = [a.split("=", 1)[0] for a in argv[2:] if a.split("=", 1)[0] in BENCH_FLAGS]
    return [f"armature: gym bench {flag}: set the key instead, e.g. {BENCH_FLAGS[flag]}" for flag in used]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armature", description="Armature: RLHF for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="online RL fine-tuning (configs/train.yaml)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.num_epochs=20")
    train.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="AER / RSI of policies on a prompt suite (configs/algo/eval.yaml)")
    evaluate.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.policies.tuned=<adapter>")
    evaluate.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    evaluate.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="the image generator on Ray Serve (configs/serve.yaml)")
    serve.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. limits.max_steps=30")
    serve.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    serve.add_argument(
        "--serve-config", action="store_true", help="print a Ray Serve config file (serve deploy / serve run) and exit"
    )
    serve.set_defaults(func=cmd_serve)

    submit = sub.add_parser("submit", help="send a job to a Ray cluster (Ray Jobs API)")
    submit.add_argument("job", help="the job to run there, e.g. train")
    submit.add_argument("overrides", nargs="*", help="Hydra overrides of that job")
    submit.add_argument("--address", help="Jobs API address, e.g. http://head:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--working-dir", help="a local folder to ship as the job's working directory")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment")
    submit.add_argument("--wait", action="store_true", help="block until the job ends; exit 1 unless it succeeded")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list submitted jobs, or show one's status / logs, or stop it")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("submission_id", nargs="?")
    jobs.add_argument("--address", help="Jobs API address (default: RAY_ADDRESS)")
    jobs.set_defaults(func=cmd_jobs)

    fetch = sub.add_parser("assets", help="fetch model files a reward needs once (pose: MediaPipe BlazePose)")
    fetch.add_argument("what", choices=["pose"], help="pose: the MediaPipe BlazePose models of the `pose` reward")
    fetch.add_argument("--cache-dir", help="where to put them (default $ARMATURE_CACHE/pose or ~/.cache/armature/pose)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    fetch.add_argument("--wheel", help="extract from this mediapipe wheel instead of downloading it")
    fetch.set_defaults(func=cmd_assets)

    gym = sub.add_parser("gym", help="the anatomy gym: check the oracle, build defect pairs")
    gym.add_argument(
        "action",
        choices=["check", "pairs", "pretrain", "bench"],
        help="check: the oracle's agreement with ground truth; pairs: write injector pairs; "
        "pretrain: train the base policy; bench: learners and Best-of-N against the oracle",
    )
    gym.add_argument(
        "overrides",
        nargs="*",
        help="bench: keys of configs/gym_bench.yaml (learners=[ddpo] pairs=4000 out=x); other Hydra "
        "overrides go to every stage, e.g. tracking=server",
    )
    gym.add_argument("--intact", type=int, default=1000, help="check: intact figures")
    gym.add_argument("--per-kind", type=int, default=300, help="check: broken figures per defect kind")
    gym.add_argument(
        "--roundtrip",
        action="store_true",
        help="check: judge the figures after an encode-decode round trip through the base policy's "
        "VAE; pairs: store both images after that round trip",
    )
    gym.add_argument("--crossed", type=float, default=None, help="pairs: share of pairs crossed between figures")
    gym.add_argument(
        "--graded",
        type=float,
        default=None,
        help="pairs: share of severe pairs set against a milder defect of the same figure",
    )
    gym.add_argument("--n", type=int, default=None, help="pairs: how many")
    gym.add_argument("--out", help="pairs, pretrain: output folder")
    gym.add_argument("--seed", type=int, default=0)
    gym.add_argument("--minutes", type=float, default=0.0, help="pretrain: wall-time budget (default 30)")
    gym.add_argument("--threads", type=int, default=0, help="pretrain: torch threads (default: torch's)")
    gym.set_defaults(func=cmd_gym)

    from armature.feedback.commands import add_parser as add_label_parser  # armature label serve|annotator|...

    add_label_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    retired = bench_flag_errors(argv)
    if retired:
        print("\n".join(retired), file=sys.stderr)
        return 2
    parser = build_parser()
    # Hydra overrides may follow flags (`gym bench --out x tracking=server`): argparse gives the
    # positional list up once flags start, so the strings left over are overrides, in order.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except ConnectionError as err:
        print(
            f"armature: {err} Start a cluster (`ray start --head`) or pass --address / set RAY_ADDRESS.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
