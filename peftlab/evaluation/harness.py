"""lm-evaluation-harness plug-in: the ``peftlab`` model type.

    lm_eval --model peftlab --model_args base=HF_ID_OR_DIR,adapter=RUN_DIR --tasks arc_easy

loads the base model (default: the adapter's recorded base, else the embedded SmolLM2) with any
peftlab adapter (ETHER, AdapterH, VeRA, … which PEFT cannot load) or a PEFT LoRA, VeRA or OFT directory, and
hands it to lm-eval's own ``hf`` implementation, so requests are tokenised, batched and scored
exactly as ``--model hf`` does. Further arguments (``batch_size``, ``max_length``, …) pass through.

lm-eval discovers models only through its own registry; ``peftlab.evaluation.lm_eval_hook`` (run at
interpreter start by the ``peftlab-lm-eval.pth`` file installed with peftlab) adds ``peftlab`` to it
lazily. In Python, importing this module registers it too::

    import lm_eval, peftlab.evaluation.harness
    lm_eval.simple_evaluate(model="peftlab", model_args="adapter=runs/ether", tasks=["arc_easy"])
"""
from __future__ import annotations

import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from peftlab.io import load_adapted


@register_model("peftlab")
class PeftlabLM(HFLM):
    def __init__(self, base: str | None = None, adapter: str | None = None, dtype: str = "float32",
                 device: str | None = None, **kwargs):
        model, tokenizer = load_adapted(adapter, base, padding_side="left", dtype=dtype)
        model.to(_device(device)).eval()
        for unused in ("pretrained", "tokenizer", "peft", "delta"):  # the model is built here, not by HFLM
            if kwargs.pop(unused, None) is not None:
                raise ValueError(f"model_args {unused}= is not used by --model peftlab: give base= and adapter=")
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """A Bitune model must be told where the context ends (it reads the context as its prompt,
        twice), which lm-eval's plain forward cannot say: its requests go through peftlab's scorer,
        which passes the prompt length. Every other model keeps lm-eval's own path."""
        from peftlab.evaluation.choice import _pad_id, option_logliks
        from peftlab.methods.bitune import is_bitune

        if not is_bitune(self.model):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups = [[((context + continuation)[-self.max_length:], len(continuation))]
                  for _, context, continuation in requests]
        results = [scored[0] for scored in option_logliks(self.model, groups, _pad_id(self.tokenizer),
                                                          batch_size=_int_or(override_bs or self.batch_size, 8))]
        for (key, _, _), answer in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return results


def _device(requested: str | None) -> str:
    """The device to evaluate on: ``requested``, but the CPU (with a warning) for a CUDA device on a machine
    without CUDA, as lm-eval's ``hf`` model does (its command line asks for cuda:0 unless --device is given)."""
    if requested and not str(requested).startswith("cuda"):
        return requested
    if torch.cuda.is_available():
        return requested or "cuda"
    if requested:
        print(f"peftlab: warning: device {requested} (lm-eval's default without --device) needs CUDA, which is not "
              "available: evaluating on the CPU (pass --device cpu to say so)", file=sys.stderr)
    return "cpu"


def _int_or(value, default: int) -> int:
    """lm-eval's batch size is a number or "auto"; peftlab's scorer takes ``default`` for "auto"."""
    return int(value) if str(value).isdigit() else default


# ------------------------------------------------------------------------------ local lm-eval tasks
_TASK_YAML = """\
# written by peftlab.evaluation.harness.write_local_task: {title} from a local LLM-Adapters file
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
process_docs: !function utils.process_{style}
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _process(dataset, style: str):
    from peftlab.evaluation.choice import loglik_requests, parse_choice_record

    def convert(record, index):
        example = parse_choice_record(dict(record), style, f"record {index}")
        requests = loglik_requests(example)
        # lm-eval joins context and choice with its target delimiter " "; ours start with that space
        return {"context": requests[0][0], "choices": [c[1:] for _, c in requests], "gold": example.label}
    return dataset.map(convert, with_indices=True)


def process_qa(dataset):
    return _process(dataset, "qa")


def process_boolq(dataset):
    return _process(dataset, "boolq")


def write_local_task(task: str, data, directory) -> str:
    """Write an lm-eval task (YAML + utils.py) named ``peftlab_<task>`` over a local LLM-Adapters file,
    posed exactly like ``peftlab eval --scoring loglik``; pass ``--include_path directory`` to lm_eval.
    WinoGrande's per-option contexts need lm-eval's own partial scoring, so it is not offered here."""
    from pathlib import Path

    from peftlab.evaluation.tasks import get_task, task_file

    spec = get_task(task)
    if spec.kind != "choice" or spec.style not in ("qa", "boolq"):
        raise ValueError(f"task {task} cannot be written as a local lm-eval task: choose one of the question-answer "
                         "choice tasks (boolq, piqa, arc_e, arc_c, obqa)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"peftlab_{spec.name}"
    (directory / f"{name}.yaml").write_text(_TASK_YAML.format(
        title=spec.title, name=name, data=Path(task_file(spec, data)).resolve(), style=spec.style))
    (directory / "utils.py").write_text("from peftlab.evaluation.harness import process_boolq, process_qa  # noqa\n")
    return name
