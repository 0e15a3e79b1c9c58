"""The ``peftlab`` command: train | generate | chat | eval | merge | export | compare | info.

Every flag of ``train`` can also come from a YAML file (``--config run.yaml``, keys spelled as the
flags with underscores); flags given on the command line win. Method hyper-parameters are flags
generated from each method's config dataclass (``--r``, ``--alpha``, ``--dropout``, …), so a new
method gets its flags and YAML keys without touching this file.

Bad input ends with one line on stderr, ``peftlab: error: <problem>: <fix>``, and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from peftlab.models import EMBEDDED_MODEL


class CliError(ValueError):
    """A command-line problem; the message names the fix."""


# -- shared helpers ---------------------------------------------------------------------------

def _parse_targets(text: str):
    """``all-linear`` | ``re:REGEX`` | ``q_proj,v_proj``."""
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    return tuple(name.strip() for name in text.split(",") if name.strip())


TARGET_FIELDS = ("target_modules", "exclude_modules")  # set through --targets, not flags of their own


def _method_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every config field that becomes a flag (method options and the SIBO booster's), with its methods."""
    from peftlab.adapters import METHODS

    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for method, adapter_class in sorted(METHODS.items()):
        for field in dataclasses.fields(adapter_class.config_class):
            if field.name not in TARGET_FIELDS and not field.name.startswith("projection_shape"):
                fields.setdefault(field.name, (field, []))[1].append(method)
    return fields


def _boolean(text: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return words[text.lower()]


def _field_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return _boolean
    if isinstance(default, (int, float)):
        number = type(default)
        if "str" in str(field.type):  # a number or a keyword, e.g. bottleneck --scaling learned
            return lambda text: _number_or_word(text, number)
        return number
    return str


def _number_or_word(text: str, number: type):
    try:
        return number(text)
    except ValueError:
        return text


def _load_model_and_adapter(args, padding_side: str = "left"):
    """The base model (from --model, or the one recorded in the adapter) with --adapter loaded."""
    from peftlab.io import load_adapted

    return load_adapted(getattr(args, "adapter", None), args.model, padding_side)


# -- train ------------------------------------------------------------------------------------

TRAIN_DEFAULTS = {
    "model": EMBEDDED_MODEL, "data": None, "eval_data": None, "eval_size": 0, "limit": None,
    "template": "chat", "max_length": 512, "train_on_prompt": False,
    "method": "lora", "targets": None, "output": None, "overwrite": False, "resume": False,
    "max_steps": None, "epochs": 1.0, "batch_size": 8, "micro_batch_size": 8, "lr": None, "weight_decay": 0.0,
    "warmup_steps": 0, "schedule": "cosine", "max_grad_norm": 1.0, "eval_every": 0, "save_every": 0,
    "keep_checkpoints": 2, "seed": 0, "mixed_precision": "no", "dtype": "float32",
    "bitune": False, "bitune_mixing": None, "bitune_init": None, "kl_lr": None, "kl_cycle": None,
    "bita_prompt_tokens": 16, "bita_mask_tokens": 3, "bita_groups": 64, "bita_repeats": 1,
}
DTYPES = ("float32", "bfloat16", "float16")  # --dtype: what the base model is loaded in
BITA_LR = 1e-2  # the paper's 3e-2 is for 7B+ models and a batch of 128; 1e-2 for small models (spec appendix A)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with an adapter method",
                       description="Fine-tune a causal LM with a parameter-efficient method. Flags override --config.")
    a = p.add_argument
    a("--config", help="YAML file whose keys are these flags' names with underscores (e.g. max_steps: 200)")
    a("--model", help=f"base model: HF id, local directory, .gguf file, or {EMBEDDED_MODEL} (default)")
    a("--data", help="training data: .json/.jsonl file (Alpaca, LLM-Adapters, GSM8K or prompt/response records), "
                     "hf:NAME[:SPLIT], or builtin:arithmetic[:N]")
    a("--eval-data", help="evaluation data (same formats); reported as eval loss")
    a("--eval-size", type=int, help="hold out this many training examples for evaluation (default 0)")
    a("--limit", type=int, help="use only the first N training examples")
    a("--template", help="prompt template: chat (the tokenizer's own, default), alpaca or plain")
    a("--max-length", type=int, help="truncate examples to this many tokens (default 512)")
    a("--train-on-prompt", action="store_true", default=None, help="also train on the prompt tokens")
    a("--method", help="adapter method (default lora); `peftlab info` lists them")
    a("--targets", help="modules to adapt: all-linear, comma-separated names (q_proj,v_proj) or re:REGEX over "
                        "full module names (default: the method's own, all-linear for most)")
    from peftlab.adapters import METHODS

    for name, (field, methods) in _method_fields().items():
        owners = "all methods" if len(methods) == len(METHODS) else "/".join(methods)
        defaults = {m: next(f.default for f in dataclasses.fields(METHODS[m].config_class) if f.name == name)
                    for m in methods}
        default = field.default if len(set(map(repr, defaults.values()))) == 1 else \
            ", ".join(f"{m} {d}" for m, d in defaults.items())  # methods differ: vera's r is 256, lora's 8
        a(f"--{name.replace('_', '-')}", type=_field_type(field), help=f"{owners}: {name} (default {default})")
    a("--bitune", action="store_true", default=None,
      help="Bitune: read the prompt twice (causal and bidirectional, one adapter each) and mix the two KV caches")
    a("--bitune-mixing", help="Bitune: abs (the paper's variant 607, default) or relu (its simplified 801)")
    a("--bitune-init", type=float, help="Bitune: start value of the mixing weights and their constant t (default 0.01)")
    a("--kl-lr", type=float, help="blob: SGD learning rate of the std parameters and the KL term (default 0.01)")
    a("--kl-cycle", type=int, help="blob: steps per cycle of the KL weight (default: the paper's rule, "
                                   "int(100·N^(π/8)/batch))")
    a("--bita-prompt-tokens", type=int, help="bita: prefix key/value vectors per layer, P (default 16)")
    a("--bita-mask-tokens", type=int, help="bita: mask tokens, M: tokens drafted per pass (default 3)")
    a("--bita-groups", type=int, help="bita: mask groups packed per sequence (default 64)")
    a("--bita-repeats", type=int, help="bita: copies of each pair, each with its own random window of groups "
                                       "(default 1; the paper uses 4)")
    a("--output", help="run directory (default runs/<method>)")
    a("--overwrite", action="store_true", default=None, help="replace the run already in --output")
    a("--resume", action="store_true", default=None, help="continue the run in --output from its latest checkpoint")
    a("--max-steps", type=int, help="optimizer steps (default: from --epochs)")
    a("--epochs", type=float, help="passes over the data when --max-steps is not given (default 1)")
    a("--batch-size", type=int, help="global batch: examples per optimizer step (default 8)")
    a("--micro-batch-size", type=int, help="examples per forward pass on one process (default 8)")
    a("--lr", type=float, help=f"peak learning rate (default 2e-4; {BITA_LR} for bita)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    a("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    a("--schedule", help="cosine (default), linear or constant after warmup")
    a("--max-grad-norm", type=float, help="gradient clipping norm, 0 to disable (default 1.0)")
    a("--eval-every", type=int, help="steps between evaluations (default: at the end only)")
    a("--save-every", type=int, help="steps between checkpoints for --resume (default 0: none)")
    a("--keep-checkpoints", type=int, help="checkpoints to keep (default 2)")
    a("--seed", type=int, help="seed for data order and adapter initialisation (default 0)")
    a("--mixed-precision", help="no (default), bf16 or fp16 (GPU)")
    a("--dtype", choices=DTYPES, help="dtype to load the base model in: float32 (default), bfloat16, float16")
    p.set_defaults(run=cmd_train, flag_types=_flag_types(p))


def _flag_types(parser) -> dict:
    """How a YAML value of each train flag is read: the flag's own type, bool for switches, text otherwise."""
    return {action.dest: bool if action.const is True else action.type or str
            for action in parser._actions if action.dest not in ("help", "config")}


def _yaml_value(path: Path, key: str, value, kind):
    """``value`` of YAML key ``key`` as its flag would read it, or a CliError naming the key."""
    if value is None:
        return None
    if key == "targets" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # targets: [q_proj, v_proj]
    wanted = {int: "an integer", float: "a number", bool: "true or false", _boolean: "true or false", str: "text"}
    problem = f"{value!r} is not {wanted.get(kind, 'a number')}"
    if kind is str and isinstance(value, bool):
        problem += " (YAML reads a bare yes, no, on or off as true or false: quote it)"
    if isinstance(value, str) and kind is not bool:
        try:  # read as on the command line, so "1e-4" (which YAML leaves as text) is a number
            return kind(value)
        except argparse.ArgumentTypeError as err:
            problem = str(err)
        except (ValueError, TypeError):
            pass
    elif kind in (bool, _boolean):
        if isinstance(value, bool):
            return value
    elif kind is not str and isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is not int:
            return value
        if float(value).is_integer():
            return int(value)
    raise CliError(f"config file {path}: {key}: {problem}: write it as the flag --{key.replace('_', '-')} takes it "
                   "(see `peftlab train -h`)")


def _train_settings(args) -> dict:
    """Defaults < YAML config < command-line flags."""
    import yaml

    settings = dict(TRAIN_DEFAULTS)
    method_keys = set(_method_fields())
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise CliError(f"config file {path} not found: check the path")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise CliError(f"config file {path} is not valid YAML ({str(err).splitlines()[0]}): fix its syntax") from None
        except UnicodeDecodeError:
            raise CliError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
            raise CliError(f"config file {path} must hold a mapping of option: value, with option names as keys")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(settings) - method_keys)
        if unknown:
            raise CliError(f"config file {path} has unknown keys {unknown}: use the flag names of `peftlab train -h`")
        settings.update({k: _yaml_value(path, k, v, args.flag_types.get(k, str)) for k, v in loaded.items()})
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "run", "command", "flag_types"):
            settings[key] = value
    return settings


def _bitune_config(s: dict):
    """The BituneConfig of --bitune (None without it), checked before anything is loaded."""
    options = {key: s[f"bitune_{key}"] for key in ("mixing", "init") if s[f"bitune_{key}"] is not None}
    if not s["bitune"]:
        if options:
            raise CliError(f"--bitune-{'/--bitune-'.join(options)} applies only with --bitune: add --bitune or remove it")
        return None
    if s["train_on_prompt"]:
        raise CliError("--bitune needs the prompt masked out of the loss (it reads the prompt twice): "
                       "remove --train-on-prompt")
    from peftlab.methods.bitune import BituneConfig

    return BituneConfig(**options)


def cmd_train(args) -> int:
    from peftlab.adapters import method_class
    from peftlab.data import DataError, get_template, load_examples, tokenize_examples
    from peftlab.inject import add_adapter, format_summary, trainable_summary
    from peftlab.models import load_model, load_tokenizer
    from peftlab.train import prepare_run_dir, train

    s = _train_settings(args)
    if not s["data"]:
        raise CliError("no training data: pass --data FILE (or builtin:arithmetic), or set data: in --config")
    for key in ("limit", "max_length"):  # for every method, before anything loads
        if s[key] is not None and s[key] < 1:
            raise CliError(f"--{key.replace('_', '-')} must be positive, got {s[key]}: leave it out for the default")
    bita_options = sorted(k for k in TRAIN_DEFAULTS if k.startswith("bita_") and s[k] != TRAIN_DEFAULTS[k])
    if s["method"] == "bita":
        return _train_bita(s)
    if bita_options:
        raise CliError(f"option(s) {bita_options} apply only to --method bita: remove them")
    if s["lr"] is None:  # an explicit 0 stays 0, for TrainConfig to refuse
        s["lr"] = 2e-4
    adapter_class = method_class(s["method"])
    method_values = {f.name: s[f.name] for f in dataclasses.fields(adapter_class.config_class)
                     if f.name in s and f.name not in TARGET_FIELDS}
    if s["targets"]:
        method_values["target_modules"] = _parse_targets(str(s["targets"]))
    adapter_config = adapter_class.config_class(**method_values)
    unused = sorted(k for k in set(_method_fields()) & set(s) if k not in method_values)
    if unused:
        raise CliError(f"option(s) {unused} do not apply to method {s['method']}: remove them")
    bitune_config = _bitune_config(s)
    kl_options = {key: s[key] for key in ("kl_lr", "kl_cycle") if s[key] is not None}
    if kl_options and s["method"] != "blob":
        raise CliError(f"--{'/--'.join(k.replace('_', '-') for k in kl_options)} applies only to --method blob: "
                       "remove it or train BLoB")
    output = Path(s["output"] or f"runs/{s['method']}" + ("-bitune" if bitune_config else ""))
    train_config = _train_config(s, output)
    examples = load_examples(str(s["data"]), limit=s["limit"])  # validate inputs before touching the run dir
    eval_examples = load_examples(str(s["eval_data"])) if s["eval_data"] else []
    if s["eval_size"] < 0:
        raise CliError(f"--eval-size must be >= 0 (training examples held out for evaluation), got {s['eval_size']}")
    if s["eval_size"]:
        if s["eval_size"] >= len(examples):
            raise DataError(f"--eval-size {s['eval_size']} leaves no training examples out of {len(examples)}: "
                            "lower it")
        import random
        shuffled = examples[:]
        random.Random(s["seed"]).shuffle(shuffled)
        eval_examples, examples = eval_examples + shuffled[:s["eval_size"]], shuffled[s["eval_size"]:]
    tokenizer = load_tokenizer(s["model"])
    model = load_model(s["model"], dtype=s["dtype"])
    template = get_template(s["template"], tokenizer)
    # The adapter goes in before the run dir is touched: a target that matches nothing or a size that does
    # not fit a layer fails with the output directory untouched.
    objective = None
    if bitune_config is not None:
        from peftlab.methods.bitune import BituneObjective, add_bitune

        add_bitune(model, adapter_config, bitune_config, seed=s["seed"])
        objective = BituneObjective()
    else:
        add_adapter(model, adapter_config, seed=s["seed"])
    train_data = tokenize_examples(examples, tokenizer, template, max_length=s["max_length"],
                                   train_on_prompt=bool(s["train_on_prompt"]))
    eval_data = tokenize_examples(eval_examples, tokenizer, template, max_length=s["max_length"]) \
        if eval_examples else None
    if s["method"] == "blob":  # the KL term and the SGD group on top of the likelihood (adapters/blob.py)
        from peftlab.adapters.blob import BlobObjective, kl_cycle

        cycle = kl_options.get("kl_cycle")
        if cycle is None:
            cycle = kl_cycle(len(train_data), train_config.batch_size)
        objective = BlobObjective(objective, cycle=cycle, kl_lr=kl_options.get("kl_lr", 0.01))
    train_config.check_data(len(train_data))  # the last check before an old run may be removed
    output = prepare_run_dir(output, overwrite=bool(s["overwrite"]), resume=bool(s["resume"]))
    if train_data.n_truncated or train_data.n_dropped:
        print(f"note: {train_data.n_truncated} example(s) truncated and {train_data.n_dropped} dropped at "
              f"--max-length {s['max_length']}", file=sys.stderr)
    summary = trainable_summary(model)
    print(format_summary(summary))
    result = train(model, train_data, train_config, tokenizer=tokenizer, eval_data=eval_data, resume=bool(s["resume"]),
                   objective=objective,
                   run_info={"settings": s, "adapter": adapter_config.to_dict(),
                             "bitune": bitune_config.to_dict() if bitune_config else None,
                             "trainable_parameters": summary["trainable"], "truncated": train_data.n_truncated,
                             "dropped": train_data.n_dropped})
    print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}; run saved in {output}")
    return 0


def _train_config(s: dict, output: Path):
    """The TrainConfig of the settings, which checks them; the model's dtype is checked here too."""
    from peftlab.train import TrainConfig

    if s["dtype"] not in DTYPES:
        raise CliError(f"--dtype {s['dtype']!r} is not one of {', '.join(DTYPES)}: choose one of them")

    return TrainConfig(
        output_dir=str(output), max_steps=s["max_steps"], epochs=s["epochs"], batch_size=s["batch_size"],
        micro_batch_size=min(s["micro_batch_size"], s["batch_size"]), lr=s["lr"], weight_decay=s["weight_decay"],
        warmup_steps=s["warmup_steps"], schedule=s["schedule"], max_grad_norm=s["max_grad_norm"] or None,
        eval_every=s["eval_every"], save_every=s["save_every"], keep_checkpoints=s["keep_checkpoints"],
        seed=s["seed"], mixed_precision=s["mixed_precision"])


def _train_bita(s: dict) -> int:
    """BiTA: prompt and mask tokens on a frozen model, trained on `peftlab distill` pairs."""
    from peftlab.distill import read_pairs
    from peftlab.inject import format_summary, trainable_summary
    from peftlab.methods.bita import BitaConfig, BitaObjective, add_bita, collate, training_data
    from peftlab.models import load_model, load_tokenizer
    from peftlab.train import prepare_run_dir, train

    foreign = [k for k in ("targets", "bitune", "eval_data", "eval_size", "kl_lr", "kl_cycle")
               if s[k] not in (None, False, 0)] + sorted(k for k in set(_method_fields()) & set(s))
    if foreign:
        raise CliError(f"option(s) {foreign} do not apply to --method bita (prompt and mask tokens on a frozen "
                       "model): remove them")
    if s["bita_groups"] < 1 or s["bita_repeats"] < 1:
        raise CliError(f"--bita-groups and --bita-repeats must be >= 1, got {s['bita_groups']} and "
                       f"{s['bita_repeats']}")
    config = BitaConfig(prompt_tokens=s["bita_prompt_tokens"], mask_tokens=s["bita_mask_tokens"])
    if s["lr"] is None:
        s["lr"] = BITA_LR
    output = Path(s["output"] or "runs/bita")
    train_config = _train_config(s, output)
    pairs = read_pairs(s["data"])[:s["limit"]]  # validate inputs before touching the run dir
    tokenizer, model = load_tokenizer(s["model"]), load_model(s["model"], dtype=s["dtype"])
    bita = add_bita(model, config, seed=s["seed"])
    vocab = bita.mask_id
    bad = next((i for i, p in enumerate(pairs) if max(p["prompt_ids"] + p["response_ids"]) >= vocab), None)
    if bad is not None:
        raise CliError(f"{s['data']} record {bad} has token ids beyond this model's vocabulary ({vocab}): "
                       "distill with the same --model")
    data = training_data(pairs, bita, max_groups=s["bita_groups"], repeats=s["bita_repeats"], seed=s["seed"],
                         max_length=s["max_length"])
    if not data:
        raise CliError(f"no pair in {s['data']} has a response longer than {config.mask_tokens} tokens: "
                       "distill with a larger --max-new-tokens")
    train_config.check_data(len(data))
    output = prepare_run_dir(output, overwrite=bool(s["overwrite"]), resume=bool(s["resume"]))
    summary = trainable_summary(model)
    print(format_summary(summary))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = train(model, data, train_config, tokenizer=tokenizer, resume=bool(s["resume"]), objective=BitaObjective(),
                   collate_fn=lambda features: collate(features, pad),
                   run_info={"settings": s, "bita": config.to_dict(), "pairs": len(pairs),
                             "trainable_parameters": summary["trainable"]})
    print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}; run saved in {output}")
    return 0


# -- generate / chat ----------------------------------------------------------------------------

def add_generation_flags(p) -> None:
    p.add_argument("--model", help=f"base model (default: the adapter's base, else {EMBEDDED_MODEL})")
    p.add_argument("--adapter", help="run directory with adapter.json (or a PEFT LoRA, VeRA or OFT directory)")
    p.add_argument("--template", default="chat", help="prompt template: chat (default), alpaca, plain, or none "
                                                      "to send the prompt as it is")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")


def cmd_generate(args) -> int:
    from peftlab.data import check_template_name
    from peftlab.generate import check_options, check_output_file, generate
    from peftlab.methods.bita import parse_tree

    prompts = list(args.prompt or [])
    if args.prompts:
        from peftlab.data import load_examples
        prompts += [e.instruction + ("\n\n" + e.input if e.input else "") for e in load_examples(args.prompts)]
    if not prompts:
        raise CliError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    if args.tree and not args.accelerate:
        raise CliError("--tree applies only with --accelerate bita: add --accelerate bita or remove --tree")
    if args.accelerate and not args.adapter:
        raise CliError(f"--accelerate {args.accelerate} needs the trained tokens: pass --adapter RUN "
                       "(a run of `peftlab train --method bita`)")
    tree = parse_tree(args.tree)
    check_options(args.max_new_tokens, args.temperature, args.top_p, args.batch_size)  # before the model loads
    check_template_name(args.template, extra=("none",))
    if args.output:
        check_output_file(args.output)  # a bad path must not throw the generated text away at the end
        if args.prompts and Path(args.output).resolve() == Path(args.prompts).resolve():
            raise CliError(f"--output {args.output} is the --prompts file: choose another --output")
        if Path(args.output).exists() and not args.overwrite:
            raise FileExistsError(f"{args.output} exists: pass --overwrite to replace it, or choose another --output")
    model, tokenizer = _load_model_and_adapter(args)
    template = None if args.template == "none" else args.template
    if args.accelerate:
        from peftlab.generate import generate_accelerated

        runs = generate_accelerated(model, tokenizer, prompts, template, args.max_new_tokens, args.temperature,
                                    args.accelerate, tree, progress=len(prompts) > 1)
        outputs = [tokenizer.decode(run.tokens, skip_special_tokens=True) for run in runs]
        tokens, forwards = sum(len(r.tokens) for r in runs), sum(r.forwards for r in runs)
        seconds = sum(r.seconds for r in runs)
        print(f"bita: {tokens} tokens in {forwards} forward passes ({tokens / max(1, forwards):.2f} per pass), "
              f"{tokens / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr)
    else:
        outputs = generate(model, tokenizer, prompts, template=template, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                           progress=len(prompts) > args.batch_size)
    if args.output:
        with open(args.output, "w") as f:
            for prompt, output in zip(prompts, outputs):
                f.write(json.dumps({"prompt": prompt, "output": output}) + "\n")
    for prompt, output in zip(prompts, outputs):
        print(output if len(prompts) == 1 else f"### {prompt}\n{output}\n")
    return 0


def cmd_distill(args) -> int:
    from peftlab.distill import distill, read_prompts, refuse_existing
    from peftlab.models import load_model, load_tokenizer

    prompts = read_prompts(args.prompts, limit=args.limit)
    output = Path(args.output)
    refuse_existing(output, args.resume, args.overwrite)  # before the model is loaded
    model, tokenizer = load_model(args.model), load_tokenizer(args.model, padding_side="left")
    distill(model, tokenizer, prompts, output, template=None if args.template == "none" else args.template,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, resume=args.resume,
            overwrite=args.overwrite)
    print(f"{len(prompts)} greedy answers of {args.model} in {output}")
    return 0


def cmd_chat(args) -> int:
    from peftlab.data import check_template_name
    from peftlab.generate import check_options, stream

    check_options(args.max_new_tokens, args.temperature, args.top_p)
    check_template_name(args.template, extra=("none",))
    if sys.stdin is None or sys.stdin.closed:
        raise CliError("chat reads messages from standard input, which is closed: run it in a terminal or pipe "
                       "messages into it")
    model, tokenizer = _load_model_and_adapter(args)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    print("peftlab chat: type a message, /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        if has_chat and args.template == "chat":
            prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            pieces = stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p)
        else:  # no chat template: single-turn prompts with the chosen training template
            template = "alpaca" if args.template == "chat" else args.template
            pieces = stream(model, tokenizer, text, template=None if template == "none" else template,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        print("model> ", end="", flush=True)
        reply = []
        for piece in pieces:
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


# -- merge / export / info ----------------------------------------------------------------------

# -- eval ---------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    import os
    import time

    from peftlab.data import check_template_name
    from peftlab.evaluation.tasks import check_task, run_task
    from peftlab.io import refuse_existing

    names = [n for item in args.task for n in item.split(",") if n]
    data = args.data or os.environ.get("PEFTLAB_DATA")
    if not data:
        raise CliError("no data: pass --data with the test file or the folder of LLM-Adapters datasets "
                       "(or set PEFTLAB_DATA)")
    if not names:
        raise CliError(f"--task {' '.join(args.task)!r} names no task: give e.g. --task svamp,arc_e")
    if len(names) > 1 and Path(data).is_file():
        raise CliError("several tasks need --data to be the data folder, not one file")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be a positive number of examples, got {args.limit}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be positive, got {value}: leave it out for the default")
    check_template_name(args.template)
    for name in names:  # every name and file is read and checked before the model is loaded
        check_task(name, data, args.limit)
    out = Path(args.output or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    refuse_existing(out, args.overwrite)  # earlier results are replaced only when asked
    model, tokenizer = _load_model_and_adapter(args)
    results = []
    for name in names:
        results.append(run_task(model, tokenizer, name, data, out, limit=args.limit, scoring=args.scoring,
                                template=args.template, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, progress=not args.quiet))
    import platform

    import torch

    summary = {"model": args.model or "(adapter's base or default)", "adapter": args.adapter,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
               "date": time.strftime("%Y-%m-%d"), "tasks": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    columns = ("acc", "acc_norm", "ece", "nll", "brier")
    print(f"{'task':<11} {'scoring':<8} {'n':>5} " + " ".join(f"{c:>8}" for c in columns) + f" {'ex/s':>7} {'time':>7}")
    for r in results:
        cells = " ".join(f"{r[c]:8.4f}" if c in r else f"{'-':>8}" for c in columns)
        print(f"{r['task']:<11} {r['scoring']:<8} {r['n']:>5} {cells} {r['examples_per_s']:7.2f} {r['seconds']:6.0f}s")
    print(f"results: {out / 'results.json'} (per-example predictions: {out}/<task>.jsonl)")
    return 0


def add_eval_parser(sub) -> None:
    from peftlab.evaluation.tasks import SCORINGS, TASKS

    p = sub.add_parser("eval", help="evaluate on arithmetic and multiple-choice benchmarks",
                       description="Evaluate a model (with an adapter) on named tasks; prints a table and "
                                   "writes results.json, per-example JSONL and reliability diagrams.")
    p.add_argument("--task", nargs="+", required=True, metavar="TASK",
                   help=f"one or more of: {', '.join(TASKS)} (space or comma separated)")
    p.add_argument("--data", help="the task's test file, or a folder with LLM-Adapters' dataset/<NAME>/test.json "
                                  "(default: $PEFTLAB_DATA)")
    p.add_argument("--model", help=f"base model (default: the adapter's base, else {EMBEDDED_MODEL})")
    p.add_argument("--adapter", help="run directory with adapter.json (or a PEFT LoRA, VeRA or OFT directory)")
    p.add_argument("--limit", type=int, help="score only the first N examples of each task")
    p.add_argument("--scoring", choices=SCORINGS, default="loglik",
                   help="multiple choice: loglik (lm-eval's acc/acc_norm, default), label (BLoB: next-token over "
                        "the option letters) or generate (LLM-Adapters: answer, then regex); arithmetic always "
                        "generates")
    p.add_argument("--template", default="alpaca-eval",
                   help="prompt template for generation: alpaca-eval (LLM-Adapters' evaluation prompt, default), "
                        "alpaca, chat or plain")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--max-new-tokens", type=int, help="generation length limit (default 256 arithmetic, 32 choice)")
    p.add_argument("--output", help="directory for results (default runs/eval-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already holds results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_eval)


def _refuse_output_over_inputs(output: Path, *inputs) -> None:
    """--overwrite replaces --output: never when that would delete an input (the adapter, the base model)."""
    target = output.resolve()
    for source in inputs:
        if source and Path(source).exists():
            path = Path(source).resolve()
            if target == path or target in path.parents:
                raise CliError(f"--output {output} would replace the input {source}: choose another --output")


def cmd_merge(args) -> int:
    from peftlab.io import refuse_existing, save_merged

    output = Path(args.output)
    _refuse_output_over_inputs(output, args.adapter, args.model)
    refuse_existing(output, args.overwrite)  # before loading anything
    model, tokenizer = _load_model_and_adapter(args, padding_side="right")
    _refuse_output_over_inputs(output, model.config.name_or_path)  # the base the adapter named
    save_merged(model, tokenizer, output, overwrite=args.overwrite)
    print(f"merged checkpoint written to {output} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args) -> int:
    from peftlab.io import export_peft, refuse_existing

    output = Path(args.output)
    _refuse_output_over_inputs(output, args.adapter, args.model)
    refuse_existing(output, args.overwrite)
    model, _ = _load_model_and_adapter(args, padding_side="right")
    _refuse_output_over_inputs(output, model.config.name_or_path)
    export_peft(model, output, base_model_name=args.model, as_lora=args.as_ == "lora", overwrite=args.overwrite)
    kind = "an exact PEFT LoRA adapter" if args.as_ == "lora" else "PEFT adapter"
    print(f"{kind} written to {output} (load it with peft.PeftModel.from_pretrained)")
    return 0


def cmd_compare(args) -> int:
    from peftlab.compare import run

    return run(args)


def _parameter_counts(model) -> list[tuple[str, str]]:
    """(method, trainable parameters with its defaults on ``model``, or why it does not fit)."""
    from peftlab.adapters import METHODS, AdapterConfigError
    from peftlab.inject import add_adapter, remove_adapter, trainable_summary

    rows = []
    for method, adapter_class in sorted(METHODS.items()):
        try:
            add_adapter(model, adapter_class.config_class(), name="count")
            rows.append((method, f"{trainable_summary(model)['trainable']:,}"))
            remove_adapter(model, "count")
        except AdapterConfigError as err:
            rows.append((method, f"does not fit with its defaults: {err}"))
    return rows


def cmd_info(args) -> int:
    from peftlab.adapters import METHODS, method_class

    method_class("lora")  # registers every method
    if args.adapter:
        from peftlab.io import (CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE, read_adapter_config,
                                read_peft_config, stored_parameters)

        folder = Path(args.adapter)
        if (folder / PEFT_CONFIG_FILE).is_file() and not (folder / CONFIG_FILE).is_file():  # a PEFT directory
            peft = read_peft_config(folder)
            count = stored_parameters(folder / PEFT_WEIGHTS_FILE)
            rest = {k: v for k, v in peft.items() if k not in ("peft_type", "base_model_name_or_path")}
            print(f"PEFT {peft['peft_type']} adapter {args.adapter}")
            print(f"  base model: {peft.get('base_model_name_or_path')}")
            print(f"  config: {json.dumps(rest)}")
            print(f"  {count:,} parameters")
            return 0
        config = read_adapter_config(args.adapter)
        count = stored_parameters(folder / WEIGHTS_FILE)
        print(f"adapter {args.adapter}")
        print(f"  base model: {config['base_model'].get('name')} ({config['base_model'].get('model_type')}, "
              f"fingerprint {config['base_model'].get('fingerprint')})")
        for name, values in config["adapters"].items():
            layers = len(config.get("targets", {}).get(name, []))
            print(f"  {name}: {json.dumps(values)} on {layers} layers")
        method = config.get("extra", {}).get("method")
        if method:
            print(f"  model-level method: {json.dumps(method)}")
        print(f"  active: {config.get('active')}; {count:,} parameters")
        return 0
    print("methods:")
    for method, adapter_class in sorted(METHODS.items()):
        doc = (adapter_class.__module__ and sys.modules[adapter_class.__module__].__doc__ or "").strip().splitlines()
        print(f"  {method:12s} {doc[0] if doc else ''}")
    print("model-level methods (on top of any adapter method):")
    print("  bitune       --bitune: the prompt read twice (causal and bidirectional), KV caches mixed per layer")
    print("  bita         --method bita: prompt + mask tokens on a frozen model; `generate --accelerate bita` drafts "
          "and verifies (lossless greedy)")
    print(f"models: {EMBEDDED_MODEL} (embedded), any HF id, local checkpoint directory or .gguf file")
    if args.model:
        from peftlab.inject import _linear_names
        from peftlab.models import load_model

        model = load_model(args.model)
        names = _linear_names(model)
        print(f"model {args.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{len(names)} adaptable linear layers named {sorted({n.rsplit('.', 1)[-1] for n in names})}")
        print("trainable parameters of each method with its defaults on this model:")
        for method, count in _parameter_counts(model):
            print(f"  {method:12s} {count}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)

    p = sub.add_parser("generate", help="generate text for prompts")
    add_generation_flags(p)
    p.add_argument("--prompt", action="append", help="an instruction (repeatable)")
    p.add_argument("--prompts", help="a data file whose instructions are the prompts")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--output", help="also write {prompt, output} lines to this JSONL file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--accelerate", choices=["bita"], help="bita: draft and verify with the adapter's BiTA tokens "
                                                          "(greedy; output identical to plain greedy decoding)")
    p.add_argument("--tree", help="bita: draft-tree widths per level, e.g. 1,1,1 (CPU default) or 5,4,3 (GPU default)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("distill", help="write the base model's greedy answers (token ids) to prompts: "
                                       "training data for BiTA", description=(
                           "Self-distillation: exact greedy decoding of the frozen base model over a prompt set, "
                           "stored as token ids (JSONL), batched and resumable."))
    p.add_argument("--model", default=EMBEDDED_MODEL, help=f"base model (default {EMBEDDED_MODEL})")
    p.add_argument("--prompts", required=True, help=".json/.jsonl prompts: strings or records with prompt, "
                                                    "instruction(+input), question or turns (MT-Bench)")
    p.add_argument("--output", required=True, help="JSONL file of prompt/response token ids to write")
    p.add_argument("--template", default="chat", help="prompt template: chat (default), alpaca, plain, or none")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8; 1 is "
                                                             "bit-exact batch-1 greedy)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --output")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(run=cmd_distill)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    add_generation_flags(p)
    p.set_defaults(run=cmd_chat)
    add_eval_parser(sub)

    for name, help_text, output_help, run in (
            ("merge", "merge an adapter into a plain transformers checkpoint", "directory for the merged checkpoint",
             cmd_merge),
            ("export", "export an adapter in PEFT's format (LoRA, VeRA, OFT; ETHER and VeRA --as lora)",
             "directory for adapter_config.json + adapter_model.safetensors", cmd_export)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
        p.add_argument("--adapter", required=True, help="run directory with adapter.json (or a PEFT LoRA, VeRA or OFT directory)")
        p.add_argument("--output", required=True, help=output_help)
        p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
        if name == "export":
            p.add_argument("--as", dest="as_", choices=["peft", "lora"], default="peft",
                           help="peft: the same method in PEFT (default); lora: an exact LoRA with the same merged "
                                "weights (ETHER family, VeRA, LoRA), servable by any LoRA runtime")
        p.set_defaults(run=run)

    p = sub.add_parser("compare", help="train several methods on one budget; one table and plot",
                       description="Train several methods on the same data, budget and seeds and compare them.")
    from peftlab.compare import add_arguments

    add_arguments(p)
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("calibrate", help="train classifiers (MLE, MAP, MC dropout, ensemble, BLoB) and compare "
                                         "their calibration", description=(
                           "Train and score each method on a multiple-choice task in BLoB's label-token framing, "
                           "over several seeds: ACC, ECE, NLL and Brier (mean ± std), a bar plot and reliability "
                           "diagrams."))
    from peftlab import calibrate

    calibrate.add_arguments(p)
    p.set_defaults(run=calibrate.run)

    p = sub.add_parser("ui", help="a local web page: side-by-side chat, runs, uncertainty, BiTA speed",
                       description="Serve a web page (on 127.0.0.1) to try the base model and adapters side by side.")
    from peftlab import ui

    ui.add_arguments(p)
    p.set_defaults(run=ui.run)

    p = sub.add_parser("info", help="list methods; describe a model or an adapter file")
    p.add_argument("--model", help="describe this model's adaptable layers")
    p.add_argument("--adapter", help="describe this adapter directory")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from peftlab.adapters import AdapterConfigError
    from peftlab.compare import CompareError
    from peftlab.data import DataError
    from peftlab.io import AdapterFileError
    from peftlab.models import ModelLoadError
    from peftlab.train import TrainConfigError
    from peftlab.ui import UiError
    from peftlab.workbench import WorkbenchError

    args = build_parser().parse_args(argv)
    expected = (CliError, DataError, AdapterConfigError, AdapterFileError, TrainConfigError, ModelLoadError,
                FileExistsError, UiError, WorkbenchError, CompareError)
    try:
        return args.run(args)
    except expected as err:
        message = " ".join(str(err).split())  # always one line
        print(f"peftlab: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a file-system problem no check foresaw: still one line that names the path
        where = f": {err.filename}" if err.filename else ""
        print(f"peftlab: error: {err.strerror or err}{where}: check the path and its permissions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
