"""Command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _demo_model(args: argparse.Namespace) -> int:
    from phi4.demo import write_demo_checkpoint

    path = write_demo_checkpoint(Path(args.directory), num_shards=args.shards, fp8=args.fp8)
    print(f"wrote the demo checkpoint to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from phi4 import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    if args.chat:
        results = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        results = llm.generate(args.prompt, params)
    result = results[0]
    print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason}))
    return 0


def _milliseconds(text: str) -> float:
    """--stream-interval-ms, refused at parsing with ClusterOptions' own rule (phi4/cluster/options.py)."""
    from phi4.cluster.options import stream_interval_ms

    try:
        return stream_interval_ms(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from phi4.config import EngineConfig
    from phi4.server.serve import ServeOptions, serve

    engine = EngineConfig(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        **_numerics(args),
    )
    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None \
            or args.ray_address is not None:
        from phi4.cluster.options import ClusterOptions, use_local_ray_serve_settings

        if args.ray_address is None:
            use_local_ray_serve_settings(frozenset({args.port}))  # before Ray Serve is imported: it reads them
        from phi4.cluster.app import serve_cluster  # Ray is imported only here

        cluster = ClusterOptions(
            model=args.model, served_model_name=args.served_model_name,
            api_key=args.api_key or os.environ.get("PHI4_API_KEY") or None, max_queue=args.max_queue,
            max_stop_sequences=args.max_stop_sequences, device=args.device, dtype=args.dtype, engine=engine,
            replicas=args.replicas or 1, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests, cpus_per_replica=args.cpus_per_replica,
            bind_cpus=args.bind_cpus, stream_interval_ms=args.stream_interval_ms, body_timeout=args.body_timeout,
        )
        return serve_cluster(cluster, args.host, args.port, args.ray_address)
    return serve(ServeOptions(
        model=args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("PHI4_API_KEY") or None, max_queue=args.max_queue,
        max_stop_sequences=args.max_stop_sequences, device=args.device, dtype=args.dtype, engine=engine,
        graceful_shutdown_seconds=args.graceful_shutdown_seconds, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
    ))


def _eval(args: argparse.Namespace) -> int:
    from phi4.eval.command import EvalOptions, run_eval

    return run_eval(EvalOptions(
        bench=args.bench, base_url=args.base_url, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        served_model=args.served_model, model=args.model, max_model_len=args.max_model_len,
        data=Path(args.data) if args.data else None, limit=args.limit, concurrency=args.concurrency,
        repeats=args.repeats, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
        extraction=args.extraction, timeout_seconds=args.timeout, output=Path(args.output) if args.output else None,
        fresh=args.fresh,
    ))


def _chat(args: argparse.Namespace) -> int:
    from phi4.chat.command import ChatOptions, run_chat

    return run_chat(ChatOptions(
        model=args.model, base_url=args.base_url, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        served_model=args.served_model, max_model_len=args.max_model_len, device=args.device, system=args.system,
        history=Path(args.history) if args.history else None, plain=args.plain,
    ))


def _bench(args: argparse.Namespace) -> int:
    from phi4 import LLM
    from phi4.bench import run_offline

    llm = LLM(args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False,
              max_num_seqs=max(256, max(args.num_seqs)), max_num_batched_tokens=max(2048, args.max_num_batched_tokens),
              **_numerics(args))
    for num_seqs in args.num_seqs:
        for _ in range(args.repeats):
            figures = run_offline(llm, args.prompt_len, args.output_len, num_seqs, ignore_eos=args.ignore_eos)
            print(json.dumps({"figure": "offline", "model": args.model, "quantization": args.quantization, **figures}),
                  flush=True)
    return 0


def _add_numerics_options(parser: argparse.ArgumentParser) -> None:
    """How the model computes: the same options for serve and bench."""
    parser.add_argument("--no-batch-invariance", action="store_true",
                        help="fastest kernels; a request's output may then change with the load")
    parser.add_argument("--quantization", choices=["fp8"], default=None, help="float8 weights (per-channel scales)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument("--attention-backend", choices=["auto", "triton", "cpu", "torch"], default="auto",
                        help="auto: Triton on CUDA, phi4's kernel on CPU; torch: the reference backend")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")


def _numerics(args: argparse.Namespace) -> dict[str, object]:
    """The EngineConfig fields that _add_numerics_options sets."""
    return {"batch_invariant": not args.no_batch_invariance, "quantization": args.quantization,
            "attention_backend": args.attention_backend, "cuda_graphs": not args.enforce_eager}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi4", description="Inference for Microsoft's Phi-4 family")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-model", help="write the offline demo checkpoint to a directory")
    demo.add_argument("directory")
    demo.add_argument("--shards", type=int, default=1, help="split the weights into this many safetensors files")
    demo.add_argument("--fp8", action="store_true",
                      help="pre-quantized float8 projections, in the compressed-tensors layout")
    demo.set_defaults(handler=_demo_model)

    serve = commands.add_parser("serve", help="the OpenAI-compatible HTTP server")
    serve.add_argument("--model", default="microsoft/phi-4", help="demo, a local checkpoint directory, or a Hub id")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default="microsoft/phi-4", help="the model name clients must send")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set PHI4_API_KEY)")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048)
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="sequences (prompts x n) that may wait; a request beyond gets 429 (400 if larger)")
    serve.add_argument("--max-stop-sequences", type=int, default=16, help="stop strings a request may give")
    serve.add_argument("--graceful-shutdown-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long requests in flight may finish before they end with an error")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a client has to send a request's headers")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a client may pause while sending a body (then 408)")
    serve.add_argument("--replicas", type=int, default=None,
                       help="serve N engine replicas behind one endpoint on Ray Serve (one device each)")
    serve.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least this many replicas")
    serve.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most this many replicas")
    serve.add_argument("--target-ongoing-requests", type=float, default=16.0,
                       help="autoscale: the ongoing requests per replica to aim for")
    serve.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. auto, or ray://head:10001); default: start a local one")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="on CPU nodes, the cores each replica takes (on GPU nodes each takes one GPU)")
    serve.add_argument("--bind-cpus", action=argparse.BooleanOptionalAction, default=True,
                       help="with replicas on CPU: bind each replica of whole cores to cores of its own on its node "
                            "(--no-bind-cpus: leave placing them to the OS)")
    serve.add_argument("--stream-interval-ms", type=_milliseconds, default=50.0,
                       help="with replicas: a replica sends a stream's tokens in batches this far apart (its first "
                            "and last at once); longer spends less CPU per token, shorter updates clients more often")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--no-prefix-caching", action="store_true")
    _add_numerics_options(serve)
    serve.set_defaults(handler=_serve)

    evaluate = commands.add_parser("eval", help="MMLU, GPQA, MATH or HumanEval against an OpenAI-compatible endpoint")
    evaluate.add_argument("bench", choices=["mmlu", "gpqa", "math", "humaneval"])
    evaluate.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    evaluate.add_argument("--api-key", help="its key (default: $OPENAI_API_KEY)")
    evaluate.add_argument("--served-model", help="the model name to send (default: the endpoint's first model)")
    evaluate.add_argument("--model", help="without --base-url: serve this model (ID, DIR or demo) for the run")
    evaluate.add_argument("--max-model-len", type=int, default=None, help="with --model")
    evaluate.add_argument("--data", help="the benchmark's data file or directory (see the error message)")
    evaluate.add_argument("--limit", type=int, default=None, help="a fixed random subset of this many samples")
    evaluate.add_argument("--concurrency", type=int, default=8)
    evaluate.add_argument("--repeats", type=int, default=1, help="answers per sample (pass@k for HumanEval)")
    evaluate.add_argument("--temperature", type=float, default=0.5)
    evaluate.add_argument("--max-tokens", type=int, default=None,
                          help="per answer (default: simple-evals' 1024)")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="send each request a seed derived from this one (repeats differ, re-runs agree)")
    evaluate.add_argument("--extraction", choices=["simple-evals", "lenient"], default="simple-evals",
                          help="multiple-choice answer extraction: simple-evals' exact rules, or more forms "
                               "(named in the output)")
    evaluate.add_argument("--timeout", type=float, default=3.0,
                          help="seconds a HumanEval program may run (simple-evals: 3)")
    evaluate.add_argument("--output", help="JSON lines of every answer after a settings header; a re-run with the "
                                           "same settings resumes from it")
    evaluate.add_argument("--fresh", action="store_true", help="overwrite --output instead of resuming")
    evaluate.set_defaults(handler=_eval)

    chat = commands.add_parser("chat", help="talk to a model in the terminal (served here, or any endpoint)")
    chat.add_argument("--model", default="microsoft/phi-4",
                      help="serve this model in this process for the chat: an ID, a directory, or demo")
    chat.add_argument("--base-url", help="instead, talk to this OpenAI-compatible endpoint (e.g. .../v1)")
    chat.add_argument("--api-key", help="its key (default: $OPENAI_API_KEY)")
    chat.add_argument("--served-model", help="the model name to send (default: the endpoint's first model)")
    chat.add_argument("--max-model-len", type=int, default=None, help="with --model")
    chat.add_argument("--device", default="auto", help="with --model")
    chat.add_argument("--system", help="a system message to start with")
    chat.add_argument("--history", help="the input history file (default: ~/.local/share/phi4/chat_history)")
    chat.add_argument("--plain", action="store_true", help="print answers as plain text, without markdown")
    chat.set_defaults(handler=_chat)

    bench = commands.add_parser("bench", help="offline engine throughput and latency, as JSON lines")
    bench.add_argument("--model", default="demo")
    bench.add_argument("--prompt-len", type=int, default=512)
    bench.add_argument("--output-len", type=int, default=256)
    bench.add_argument("--num-seqs", type=int, nargs="+", default=[1], help="one or more batch sizes")
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="always generate --output-len tokens (default: on)")
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--max-num-batched-tokens", type=int, default=2048)
    _add_numerics_options(bench)
    bench.set_defaults(handler=_bench)

    generate = commands.add_parser("generate", help="complete one prompt offline and print JSON")
    generate.add_argument("prompt")
    generate.add_argument("--model", default="demo", help="demo, a local checkpoint directory, or a Hub id")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--device", default="auto")
    generate.add_argument("--dtype", default="auto")
    generate.set_defaults(handler=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from phi4.errors import Phi4Error

    try:
        return args.handler(args)
    except Phi4Error as exc:
        print(f"phi4: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
