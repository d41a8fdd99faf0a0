"""The ``kiln`` command: one verb a stage (convert, build, refit, inspect, run, serve, bench)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from kiln.cli.build_options import add_build_options, build_fields, quantize_calibration
from kiln.errors import KilnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="From published LLM weights to a fast inference engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what kiln does")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("convert", help="Hugging Face folder or GGUF file -> kiln checkpoint")
    p.add_argument("source", help="a Hugging Face model folder or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to create")
    p.set_defaults(run=_convert)

    p = verbs.add_parser("build", help="checkpoint, Hugging Face folder or GGUF file -> engine")
    p.add_argument("source", help="a kiln checkpoint, a Hugging Face model folder or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="engine folder to create")
    add_build_options(p)
    p.add_argument("--strip-weights", action="store_true", help="leave the weights out (fill with kiln refit)")
    p.add_argument("--decode-weights", action="store_true",
                   help="decode packed weights (a GGUF file's Q4_K, Q8_0, ... blocks) into --dtype instead of "
                        "keeping them packed")
    p.add_argument("--plugins", action="append", default=[], metavar="FILE.py",
                   help="a Python file registering your own op implementations (repeatable); the engine carries it")
    p.add_argument("--tune", choices=["auto", "on", "off"], default="auto",
                   help="time each op's candidate kernels at the engine's shapes and keep the fastest "
                        "(auto: on a GPU)")
    p.add_argument("--device", default=None, help="device to plan for (default: cuda if present, else cpu)")
    p.set_defaults(run=_build)

    p = verbs.add_parser("refit", help="put new weights into an engine without rebuilding it")
    p.add_argument("engine")
    p.add_argument("--checkpoint", required=True, help="kiln checkpoint with the new weights")
    p.add_argument("-o", "--output", default=None, help="write a refitted copy here instead of in place")
    p.set_defaults(run=_refit)

    p = verbs.add_parser("inspect", help="show what an engine holds")
    p.add_argument("engine")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verify", action="store_true",
                   help="also check every weight against the manifest's sha256 (exit code 1 if one does not match)")
    p.set_defaults(run=_inspect)

    p = verbs.add_parser("run", help="generate a completion with an engine (default: SmolLM2-135M-Instruct)")
    p.add_argument("model", nargs="?", default=None,
                   help="an engine, checkpoint, Hugging Face folder or .gguf file (default: the bundled SmolLM2)")
    p.add_argument("--prompt", default="What is the capital of France?", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    add_build_options(p, for_run=True)
    p.set_defaults(run=_run)

    p = verbs.add_parser("deploy", help="a ready Triton model repository for a model: preprocessing, the kiln model, "
                                        "postprocessing, an ensemble and a BLS model (kiln serve --model-repository)")
    p.add_argument("source", nargs="?", default=None,
                   help="an engine, Hugging Face folder or .gguf file (default: the bundled SmolLM2)")
    p.add_argument("--repo", required=True, help="the model repository folder to write into")
    p.add_argument("--name", default="kiln", help="the kiln model's name (default: kiln)")
    p.add_argument("--bls-name", default="kiln_bls", help="the BLS model's name (default: kiln_bls)")
    p.add_argument("--kubernetes", default=None, metavar="DIR",
                   help="also write Kubernetes manifests (Deployment, Service, HorizontalPodAutoscaler) and KServe "
                        "ones (ServingRuntime, InferenceService) for replicas of the repository into DIR")
    p.add_argument("--image", default=None,
                   help="the container image the manifests run (default: kiln-<repository folder>:latest, built "
                        "from the Dockerfile written beside them)")
    p.add_argument("--replicas", type=int, default=1, help="manifests: replicas to start with (default 1)")
    p.add_argument("--max-replicas", type=int, default=4, help="manifests: the autoscaler's limit (default 4)")
    add_build_options(p, for_run=True)
    p.set_defaults(run=_deploy)

    p = verbs.add_parser("fill-template", help="fill a TensorRT-LLM-style config template's ${key} placeholders")
    p.add_argument("file", help="the template (config.pbtxt); filled in place unless -o is given")
    p.add_argument("substitutions", help="key:value,key2:value2 (write a comma inside a value as \\,)")
    p.add_argument("-o", "--output", default=None, help="write the filled config here instead")
    p.set_defaults(run=_fill_template)

    from kiln.cli import bench, serve

    serve.add_parser(verbs, add_build_options)
    bench.add_parser(verbs)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except KilnError as e:
        print(f"kiln {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _convert(args: argparse.Namespace) -> None:
    from kiln.checkpoint.checkpoint import convert

    ckpt = convert(args.source, args.output)
    print(f"wrote checkpoint {ckpt.path} ({ckpt.config.architecture}, {ckpt.config.num_parameters():,} parameters)")


def _build(args: argparse.Namespace) -> None:
    from kiln.builder import build
    from kiln.builder.engine_cache import build_config

    config = build_config(args.source, args.dtype, args.device, **build_fields(args))
    out = build(args.source, args.output, config, strip_weights=args.strip_weights, device=args.device,
                tune={"auto": None, "on": True, "off": False}[args.tune], plugins=args.plugins,
                keep_packed=not args.decode_weights, quantize_calibration=quantize_calibration(args))
    print(f"wrote engine {out}; see it with `kiln inspect {out}`")


def _refit(args: argparse.Namespace) -> None:
    from kiln.builder import refit

    out = refit(args.engine, args.checkpoint, args.output)
    print(f"refitted engine {out}")


def _inspect(args: argparse.Namespace) -> None:
    from kiln.engine import read_engine, verify_weights
    from kiln.engine.inspect import describe, format_text

    engine = read_engine(args.engine, need_weights=args.verify)
    d = describe(engine)
    if args.verify:
        count, nbytes = verify_weights(engine)
        d["weights_verified"] = {"tensors": count, "bytes": nbytes}
    print(json.dumps(d, indent=2) if args.json else format_text(d))


def _deploy(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kiln.deploy.triton_repository import DeployOptions, deploy

    repo = Path(args.repo)
    names = deploy(args.source, repo, DeployOptions(name=args.name, bls_name=args.bls_name), dtype=args.dtype,
                   quantize_calibration=quantize_calibration(args), **build_fields(args))
    print(f"wrote {', '.join(names)} in {repo}; serve it with `kiln serve --model-repository {repo}` and ask "
          f"`curl -X POST localhost:8000/v2/models/ensemble/generate -d '{{\"text_input\": \"Hello\", "
          f"\"max_tokens\": 32}}'`")
    if args.kubernetes:
        from kiln.deploy.kubernetes import ManifestOptions, write_manifests

        written = write_manifests(Path(args.kubernetes), ManifestOptions(
            repository=repo, image=args.image, replicas=args.replicas, max_replicas=args.max_replicas))
        print(f"wrote {', '.join(p.name for p in written)} in {args.kubernetes}; apply with "
              f"`kubectl apply -f {args.kubernetes}` (see {args.kubernetes}/README.md)")


def _fill_template(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kiln.deploy.fill_template import fill, parse_substitutions

    path = Path(args.file)
    try:
        text = path.read_text()
    except OSError as e:
        raise KilnError(f"cannot read {path}: {e}") from None
    filled = fill(text, parse_substitutions(args.substitutions), str(path))
    out = Path(args.output) if args.output else path
    out.write_text(filled)
    print(f"wrote {out}")


def _run(args: argparse.Namespace) -> None:
    from kiln.builder.engine_cache import engine_for
    from kiln.runtime import LLM, SamplingParams

    engine_dir = engine_for(args.model, args.dtype, args.device, quantize_calibration=quantize_calibration(args),
                            **build_fields(args))
    llm = LLM(engine_dir, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    if args.chat:
        out = llm.chat([prompt], params)[0]
    else:
        out = llm.generate([prompt], params)[0]
    print(out.text)


if __name__ == "__main__":
    sys.exit(main())
