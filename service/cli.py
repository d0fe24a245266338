"""``python -m service serve``: start the API server on the embedded default or a given model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.api.app import create_app
    from service.config import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    try:
        settings.check_safe_to_serve()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not Path(settings.model, "config.json").is_file():
        raise SystemExit(f"no model at {settings.model}: pass --model PATH to a local LLaVA directory")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                http=args.http, loop=args.loop)


def _trainer(args: argparse.Namespace) -> None:
    from service.config import Settings
    from service.training.worker import run_trainer_process

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_trainer_process(Settings(**overrides), workers=args.workers)


def _keys(args: argparse.Namespace) -> None:
    from service.api.auth import KeyFile
    from service.config import Settings

    path = args.file or Settings().api_keys_file
    if path is None:
        raise SystemExit("no keys file: pass --file PATH or set SERVICE_API_KEYS_FILE")
    keys = KeyFile.load(path)
    if args.action in ("add", "revoke") and not args.name:
        raise SystemExit(f"keys {args.action} needs --name")
    try:
        if args.action == "add":
            scopes = [s.strip() for s in args.scope.split(",") if s.strip()]
            adapters = [a.strip() for a in args.adapters.split(",")] if args.adapters else None
            secret = keys.add(args.name, scopes, adapters)
            keys.save()
            print(secret)
            print(f"key {args.name!r} ({', '.join(scopes)}) added to {path}; the key is shown only now", file=sys.stderr)
        elif args.action == "revoke":
            keys.revoke(args.name)
            keys.save()
            print(f"key {args.name!r} revoked", file=sys.stderr)
        else:
            for k in keys.keys:
                print(f"{k['name']}\t{','.join(k['scopes'])}\t{','.join(k['adapters'] or ['*'])}")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir", dest="data_dir", type=Path)
    serve.add_argument("--adapter-dir", dest="adapter_dir", type=Path)
    serve.add_argument("--model", type=Path, help="local LLaVA directory (default: the embedded demo base)")
    serve.add_argument("--device", help="auto | cpu | cuda[:N]")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--torch-threads", dest="torch_threads", type=int,
                       help="the model's intra-op threads (default: torch's, one per core)")
    serve.add_argument("--n-slots", dest="n_slots", type=int)
    serve.add_argument("--max-rank", dest="max_rank", type=int)
    serve.add_argument("--max-batch-size", dest="max_batch_size", type=int, help="rows per batch (1 = no batching)")
    serve.add_argument("--max-wait-ms", dest="max_wait_ms", type=float,
                       help="with nothing running, how long the first request waits for company")
    serve.add_argument("--join-ratio", dest="join_ratio", type=float,
                       help="waiting requests join a running batch once there are this many per running row")
    serve.add_argument("--max-join-steps", dest="max_join_steps", type=int,
                       help="...or once the oldest has waited this many decode steps")
    serve.add_argument("--prefix-cache-mb", dest="prefix_cache_mb", type=int,
                       help="memory for cached image-prefix keys/values, reused across questions (0: off)")
    serve.add_argument("--decoded-image-cache-mb", dest="decoded_image_cache_mb", type=int,
                       help="memory for recently decoded uploads, so repeated images skip decoding (0: off)")
    serve.add_argument("--redis-url", dest="redis_url", help="queue fine-tunes on Redis for separate trainers")
    serve.add_argument("--no-embedded-trainer", dest="embedded_trainer", action="store_const", const=False,
                       help="do not train in the server process (run `python -m service trainer` instead)")
    serve.add_argument("--api-keys-file", dest="api_keys_file", type=Path, help="JSON file of hashed API keys")
    serve.add_argument("--insecure", action="store_const", const=True, help="allow a public bind without API keys")
    serve.add_argument("--rate-limit-per-minute", dest="rate_limit_per_minute", type=int, help="per API key")
    serve.add_argument("--log-level", dest="log_level", default="info")
    serve.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto",
                       help="HTTP parser (auto: httptools, the C parser, when installed)")
    serve.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                       help="event loop (auto: uvloop when installed)")
    serve.set_defaults(func=_serve)

    trainer = sub.add_parser("trainer", help="run a fine-tuning worker (use with SERVICE_REDIS_URL across machines)")
    trainer.add_argument("--data-dir", dest="data_dir", type=Path)
    trainer.add_argument("--adapter-dir", dest="adapter_dir", type=Path)
    trainer.add_argument("--model", type=Path)
    trainer.add_argument("--redis-url", dest="redis_url")
    trainer.add_argument("--device")
    trainer.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    trainer.add_argument("--workers", type=int, default=1, help="jobs trained at once in this process")
    trainer.add_argument("--log-level", dest="log_level", default="info")
    trainer.set_defaults(func=_trainer)

    keys = sub.add_parser("keys", help="manage API keys (stored hashed in SERVICE_API_KEYS_FILE)")
    keys.add_argument("action", choices=["add", "list", "revoke"])
    keys.add_argument("--name", help="key name (add, revoke)")
    keys.add_argument("--scope", default="infer", help="comma-separated: infer, admin")
    keys.add_argument("--adapters", help="comma-separated adapter names this key may use (default: all)")
    keys.add_argument("--file", type=Path, help="keys file (default: SERVICE_API_KEYS_FILE)")
    keys.set_defaults(func=_keys)

    from service import client

    finetune = sub.add_parser("finetune", help="upload a dataset to a running service and fine-tune an adapter")
    client.add_arguments(finetune)
    finetune.set_defaults(func=client.main)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
