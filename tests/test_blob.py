"""BLoB (peftlab/adapters/blob.py) and the calibration recipes (peftlab/calibrate.py): the spec's
correctness tests (blob.md §9), numbered as there."""
import json
import math

import pytest
import torch

from conftest import logits, shared_data
from peftlab.adapters import BlobConfig, LoraConfig
from peftlab.adapters.blob import (BlobObjective, blob_adapters, kl_cycle, kl_divergence, kl_weight, posterior_mean,
                                   sampled_copies)
from peftlab.calibrate import (ClassificationObjective, Predictive, classification_data, collate_classification,
                               label_logits, predict_probs, tiled_above_adapters)
from peftlab.evaluation.choice import ChoiceExample
from peftlab.inject import add_adapter
from peftlab.models import tiny_model
from peftlab.train import TrainConfig, _step_optimizers, build_optimizers, train

QV = ("q_proj", "v_proj")


def blob_model(seed=0, std=None, **config):
    """A tiny model with a BLoB adapter whose B is random (so noise reaches the output)."""
    model = tiny_model(seed=0)
    add_adapter(model, BlobConfig(target_modules=config.pop("target_modules", QV), **config), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in blob_adapters(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            if std is not None:
                layer.lora_A_g.fill_(math.sqrt(std))
    return model


def examples(n=12):
    options = ("red", "green", "blue", "yellow", "white")
    return [ChoiceExample(f"which colour is number {i}?", options[:2 + i % 4], i % 2) for i in range(n)]


@pytest.fixture
def data(tokenizer):
    return classification_data(examples(), tokenizer)


# -- 1. BLoB reduces to LoRA when the std is zero -------------------------------------------------------

def test_zero_std_layer_is_exact_lora():
    model = blob_model(std=0.0)
    layer = next(blob_adapters(model))
    x = torch.randn(3, 5, layer.in_features)
    inner = torch.nn.Linear(layer.in_features, layer.out_features)
    expected = inner(x) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    for seed in range(3):  # whatever the signs and noise drawn
        torch.manual_seed(seed)
        assert torch.allclose(layer(x, inner), expected, atol=1e-6)


def test_zero_std_model_matches_peft_lora(tokens):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    model = blob_model(std=0.0)
    peft_model = get_peft_model(tiny_model(seed=0), PeftLoraConfig(r=8, lora_alpha=16, target_modules=list(QV)))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                ours = model.get_submodule(name.replace("base_model.model.", "")).adapters["default"]
                module.lora_A["default"].weight.copy_(ours.lora_A)
                module.lora_B["default"].weight.copy_(ours.lora_B)
    assert (logits(model, tokens) - logits(peft_model, tokens)).abs().max() <= 1e-5


# -- 2. N = 0 is the mean model and draws nothing ---------------------------------------------------------

def test_posterior_mean_is_lora_with_the_mean_and_consumes_no_randomness(tokenizer, data):
    model = blob_model(std=0.05)
    lora = tiny_model(seed=0)
    add_adapter(lora, LoraConfig(target_modules=QV))
    lora.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_A_g" not in k})
    state = torch.get_rng_state()
    probs = predict_probs(model, data, 0, Predictive("N=0", 0))
    assert torch.equal(torch.get_rng_state(), state)
    expected = predict_probs(lora, data, 0, Predictive("LoRA", 0))
    assert (probs - expected).abs().max() <= 1e-6
    batch = collate_classification(data, 0)
    with torch.no_grad():
        direct = torch.softmax(label_logits(lora, batch).double(), -1)
    assert (probs - torch.nan_to_num(direct)).abs().max() <= 1e-6


def test_sampling_is_not_switched_off_by_eval_mode(tokens):
    model = blob_model(std=0.3).eval()
    assert not torch.equal(logits(model, tokens), logits(model, tokens))
    with posterior_mean(model):
        assert torch.equal(logits(model, tokens), logits(model, tokens))


# -- 3 and 4. Flipout's marginal mean, variance and covariance match direct sampling of A --------------------

def test_flipout_noise_has_the_covariance_of_sampling_a():
    """Feed the d_in basis vectors as the tokens of one sequence: the noise on token i is then column i of
    s·B·(A − M) under flipout. Over many copies, vec of these columns must have mean 0 and covariance
    s²(I ⊗ B) diag(vec Ω²) (I ⊗ B)ᵀ: block-diagonal, uncorrelated between tokens."""
    torch.manual_seed(0)
    config = BlobConfig(r=2, alpha=2.0, target_modules=QV)
    from peftlab.adapters.blob import BlobAdapter

    layer = BlobAdapter(config, in_features=3, out_features=4)
    layer.reset_parameters()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(4, 2))
        layer.lora_A_g.copy_(torch.rand(2, 3) * 0.5 + 0.5)
    copies = 100_000
    layer.copies = copies
    basis = torch.eye(3).expand(copies, 3, 3)  # copies × tokens(=3) × d_in
    with torch.no_grad():
        noise = layer.scaling * layer.flipout_noise(basis) @ layer.lora_B.t()  # copies × 3 × 4
    samples = noise.reshape(copies, 12).double()  # vec: token-major (column-stacking of s·B·ΔA)
    omega2 = layer.std().detach().double() ** 2   # r × d_in
    b = layer.lora_B.detach().double()
    blocks = [layer.scaling ** 2 * b @ torch.diag(omega2[:, i]) @ b.t() for i in range(3)]
    expected = torch.block_diag(*blocks)
    empirical = torch.cov(samples.t())
    assert samples.mean(0).abs().max() < 0.02 * expected.diagonal().sqrt().max()
    assert (empirical - expected).abs().max() < 0.03 * expected.abs().max()
    # Two tokens with the same input: under flipout their noise is uncorrelated (fresh signs per token),
    # where one weight sample per sequence would make it identical.
    x = torch.randn(3).expand(copies, 2, 3)
    with torch.no_grad():
        pair = layer.flipout_noise(x).double()  # copies × 2 tokens × r
    for k in range(2):
        assert abs(float(torch.corrcoef(pair[:, :, k].t())[0, 1])) < 0.02


def test_copies_draw_independent_noise(tokens):
    """Tiled copies of one input give different outputs (each its own Δ), and tiling above the first
    adapted layer gives exactly what tiling the input gives."""
    model = blob_model(std=0.3, target_modules=r".*layers\.1\..*(q_proj|v_proj)")
    torch.manual_seed(0)
    with torch.no_grad(), sampled_copies(model, 3):
        out = model(tokens.repeat(3, 1)).logits.view(3, *tokens.shape, -1)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    torch.manual_seed(0)
    with torch.no_grad(), sampled_copies(model, 3), tiled_above_adapters(model, 3):
        tiled = model(tokens).logits.view(3, *tokens.shape, -1)
    assert (tiled - out).abs().max() <= 1e-5


# -- 5. KL ------------------------------------------------------------------------------------------------

def test_kl_matches_torch_distributions():
    model = blob_model(std=None)
    total = 0.0
    for layer in blob_adapters(model):
        q = torch.distributions.Normal(layer.lora_A.double(), layer.std().double())
        p = torch.distributions.Normal(torch.zeros_like(q.mean), torch.full_like(q.mean, 0.2))
        total += torch.distributions.kl_divergence(q, p).sum().detach()
    ours = kl_divergence(model)
    assert ours.dtype == torch.float64
    assert abs(float(ours.detach()) - float(total)) <= 1e-3 * float(total)


def test_kl_of_the_prior_is_zero_and_its_gradients_point_to_the_prior():
    model = blob_model()
    layers = list(blob_adapters(model))
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.zero_()
            layer.lora_A_g.fill_(math.sqrt(0.2))  # Ω = σ_p
    elements = sum(layer.lora_A.numel() for layer in layers)
    assert abs(float(kl_divergence(model).detach())) < 1e-4 * elements  # the ε terms leave ~1e-5 per element
    layer = layers[0]
    for g, sign in ((0.1, -1), (0.9, 1)):  # Ω = 0.01 < σ_p: KL falls as G grows; Ω = 0.81 > σ_p: rises
        with torch.no_grad():
            layer.lora_A_g.fill_(g)
        grad, = torch.autograd.grad(layer.kl(), layer.lora_A_g)
        assert (torch.sign(grad) == sign).all()
    with torch.no_grad():
        layer.lora_A.normal_()
    grad, = torch.autograd.grad(layer.kl(), layer.lora_A)
    assert torch.allclose(grad.double(), layer.lora_A.double() / (0.2 ** 2 + 0.5e-6), rtol=1e-6)
    with torch.no_grad():
        layer.lora_A_g.uniform_(0.01, 2.0)
    assert float(layer.kl()) >= 0


# -- 6. KL weight schedule and cycle length -----------------------------------------------------------------

def test_kl_weight_schedule():
    weights = [kl_weight(t, 3) for t in range(1, 7)]
    assert weights == pytest.approx([2 / 15, 4 / 15, 8 / 15] * 2)
    assert sum(weights[:3]) == pytest.approx((2 ** 4 - 2) / (2 ** 4 - 1))
    assert kl_weight(909, 909) == pytest.approx(0.5, rel=1e-6) and math.isfinite(kl_weight(1, 909))


@pytest.mark.parametrize("n, processes, expected", [(640, 1, 316), (640, 2, 158), (1119, 1, 393), (2251, 1, 517),
                                                    (9427, 1, 909), (9427, 2, 454)])
def test_kl_cycle_matches_the_paper_table(n, processes, expected):
    assert kl_cycle(n, 4, processes) == expected


# -- 7. The optimiser partition ---------------------------------------------------------------------------

def test_optimizer_partition_and_the_kl_step():
    model = blob_model()
    config = TrainConfig(output_dir="unused", lr=1e-4)
    objective = BlobObjective(cycle=3, kl_lr=0.01)
    adamw, sgd = build_optimizers(objective.param_groups(model, config), config)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    layers = list(blob_adapters(model))
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    in_sgd = {id(p): g["terms"] for g in sgd.param_groups for p in g["params"]}
    for layer in layers:
        assert id(layer.lora_A_g) not in in_adamw and in_sgd[id(layer.lora_A_g)] == ("loss", "step_loss")
        assert id(layer.lora_A) in in_adamw and in_sgd[id(layer.lora_A)] == ("step_loss",)
        assert id(layer.lora_B) in in_adamw and id(layer.lora_B) not in in_sgd
    assert all(g["lr_scale"] == pytest.approx(100.0) for g in sgd.param_groups)
    for opt in (adamw, sgd):
        for g in opt.param_groups:
            g["lr"] = 1e-4 * g.get("lr_scale", 1.0)
    # With the likelihood's gradient masked out (no .grad), one step moves M by −lr_sgd·π·∂KL/∂M, B not at all.
    before = {id(p): p.detach().clone() for layer in layers for p in (layer.lora_A, layer.lora_B)}
    step = 2  # 0-based: π for t = 3 of a 3-cycle is 8/15
    _step_optimizers([adamw, sgd], lambda: objective.step_loss(model, step))
    pi = 8 / 15
    for layer in layers:
        expected = before[id(layer.lora_A)] * (1 - 0.01 * pi / (0.2 ** 2 + 0.5e-6))
        assert torch.allclose(layer.lora_A.detach(), expected, rtol=1e-5, atol=1e-8)
        assert torch.equal(layer.lora_B.detach(), before[id(layer.lora_B)])


# -- 10. Predictive averaging ----------------------------------------------------------------------------

def test_predictive_averages_probabilities_over_samples(data):
    model = blob_model(std=0.3)
    order = sorted(range(len(data)), key=lambda i: -len(data[i]["input_ids"]))  # predict's batch order
    batch = collate_classification([data[i] for i in order], 0)
    torch.manual_seed(5)
    one = predict_probs(model, data, 0, Predictive("N=1", 1), batch_size=len(data))
    torch.manual_seed(5)
    with torch.no_grad():
        single = torch.nan_to_num(torch.softmax(label_logits(model, batch).double(), -1))
    assert (one[order] - single).abs().max() <= 1e-6  # N = 1: the softmax of one sampled pass
    torch.manual_seed(6)
    many = predict_probs(model, data, 0, Predictive("N=4", 4), batch_size=64)
    torch.manual_seed(6)
    with torch.no_grad(), sampled_copies(model, 4), tiled_above_adapters(model, 4):
        z = label_logits(model, batch).double().view(4, len(data), -1)
    mean_of_probs = torch.nan_to_num(torch.softmax(z, -1)).mean(0)
    of_mean_logits = torch.nan_to_num(torch.softmax(z.mean(0), -1))
    assert (many[order] - mean_of_probs).abs().max() <= 1e-6
    assert (many[order] - of_mean_logits).abs().max() > 1e-4  # probabilities are averaged, not logits


def test_ensemble_averages_logits_of_its_members(data):
    model = tiny_model(seed=0)
    for m in range(2):
        add_adapter(model, LoraConfig(target_modules=QV), name=f"member{m}", seed=m)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    from peftlab.inject import active_adapters

    batch = collate_classification(data, 0)
    zs = []
    for m in range(2):
        with torch.no_grad(), active_adapters(model, [f"member{m}"]):
            zs.append(label_logits(model, batch).double())
    expected = torch.nan_to_num(torch.softmax(torch.stack(zs).mean(0), -1))
    probs = predict_probs(model, data, 0, Predictive("ens", 0, "logits"), members=("member0", "member1"),
                          batch_size=len(data))
    assert (probs - expected).abs().max() <= 1e-6


def test_mc_dropout_samples_only_with_samples(data):
    model = tiny_model(seed=0)
    add_adapter(model, LoraConfig(target_modules=QV, dropout=0.5), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    a = predict_probs(model, data, 0, Predictive("det", 0))
    assert torch.equal(a, predict_probs(model, data, 0, Predictive("det", 0)))
    torch.manual_seed(0)
    b = predict_probs(model, data, 0, Predictive("mcd", 4))
    assert (a - b).abs().max() > 1e-4


# -- 11. The label-token head -------------------------------------------------------------------------------

def test_label_logits_select_the_label_columns_and_ignore_left_padding(tokenizer, data):
    model = tiny_model(seed=0)
    batch = collate_classification(data, 0)
    with torch.no_grad():
        z = label_logits(model, batch)
        for row, f in enumerate(data):
            alone = model(torch.tensor([f["input_ids"]])).logits[0, -1]
            assert torch.allclose(z[row, :len(f["choices"])], alone[f["choices"]], atol=1e-5)
            assert torch.isinf(z[row, len(f["choices"]):]).all()


def test_label_tokens_are_single_tokens_for_the_embedded_tokenizer():
    from peftlab.evaluation.choice import label_prompt
    from peftlab.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    for example in (examples(5)[3], ChoiceExample("is it?", ("true", "false"), 0, "boolq")):
        _, labels = label_prompt(example)
        assert all(len(tokenizer.encode(label, add_special_tokens=False)) == 1 for label in labels), labels


# -- 12, 13. Checkpoint round trip and seed determinism -----------------------------------------------------

def test_checkpoint_round_trip_keeps_the_std(tmp_path, data):
    from peftlab.io import load_adapter, save_adapter

    model = blob_model(std=0.2)
    save_adapter(model, tmp_path / "run")
    loaded = tiny_model(seed=0)
    load_adapter(loaded, tmp_path / "run")
    for a, b in zip(blob_adapters(model), blob_adapters(loaded)):
        assert torch.equal(a.lora_A_g, b.lora_A_g) and torch.equal(a.lora_A, b.lora_A)
    predictive = Predictive("N=4", 4)
    torch.manual_seed(3)
    before = predict_probs(model, data, 0, predictive)
    torch.manual_seed(3)
    assert torch.equal(before, predict_probs(loaded, data, 0, predictive))


def test_seed_determinism(data):
    model = blob_model(std=0.3)
    runs = {}
    for seed in (1, 1, 2):
        for samples in (0, 10):
            torch.manual_seed(seed)
            runs.setdefault((seed, samples), []).append(predict_probs(model, data, 0, Predictive("p", samples)))
    assert torch.equal(*runs[(1, 10)]) and torch.equal(*runs[(1, 0)])
    assert not torch.equal(runs[(1, 10)][0], runs[(2, 10)][0])
    assert torch.equal(runs[(1, 0)][0], runs[(2, 0)][0])


# -- 14. Gradients through the noise path ------------------------------------------------------------------

def test_std_gets_no_likelihood_gradient_while_b_is_zero(data):
    model = tiny_model(seed=0)
    add_adapter(model, BlobConfig(target_modules=QV), seed=0)  # B = 0 as initialised
    batch = collate_classification(data, 0)
    ClassificationObjective().loss(model, batch).backward()
    layers = list(blob_adapters(model))
    assert all(torch.equal(layer.lora_A_g.grad, torch.zeros_like(layer.lora_A_g)) for layer in layers)
    model.zero_grad()
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(0, 0.1)
    ClassificationObjective().loss(model, batch).backward()
    assert all(layer.lora_A_g.grad.abs().sum() > 0 for layer in layers)


# -- training through the shared loop -------------------------------------------------------------------------

def test_blob_trains_through_the_shared_loop_and_resumes_exactly(tmp_path, data):
    def run(output, stop=None, resume=False):
        model = tiny_model(seed=0)
        add_adapter(model, BlobConfig(target_modules=QV), seed=0)
        config = TrainConfig(output_dir=str(output), max_steps=6, batch_size=4, micro_batch_size=2, lr=1e-2,
                             save_every=3, progress=False, seed=0)
        output.mkdir(exist_ok=True)
        result = train(model, data, config, objective=BlobObjective(ClassificationObjective(), cycle=2),
                       collate_fn=lambda f: collate_classification(f, 0), stop_after_steps=stop, resume=resume)
        return model, result

    whole, result = run(tmp_path / "a")
    assert all("step_loss" in h for h in result.history if "loss" in h)  # π·KL is logged
    assert (tmp_path / "a" / "checkpoints" / "step-000006" / "optimizer-1.safetensors").is_file()
    run(tmp_path / "b", stop=3)
    resumed, _ = run(tmp_path / "b", resume=True)
    for a, b in zip(blob_adapters(whole), blob_adapters(resumed)):
        assert torch.equal(a.lora_A_g, b.lora_A_g) and torch.equal(a.lora_B, b.lora_B)
    start = tiny_model(seed=0)
    add_adapter(start, BlobConfig(target_modules=QV), seed=0)
    moved = [not torch.equal(a.lora_A_g, b.lora_A_g) for a, b in zip(blob_adapters(whole), blob_adapters(start))]
    assert all(moved)  # G is trained (by the SGD group)


# -- the calibrate command -----------------------------------------------------------------------------------

def _task_folder(tmp_path, n_train=16, n_test=6):
    root = tmp_path / "data" / "dataset" / "ARC-Easy"
    root.mkdir(parents=True)

    def record(i):
        options = " ".join(f"Answer{k + 1}: option {k} of {i}" for k in range(4))
        return {"instruction": f"Please choose the correct answer to the question: what is {i}? {options}\n\n"
                               "Answer format: answer1/answer2/answer3/answer4",
                "input": "", "output": f"the correct answer is answer{i % 4 + 1}", "answer": f"answer{i % 4 + 1}"}

    (root / "train.json").write_text(json.dumps([record(i) for i in range(n_train)]))
    (root / "test.json").write_text(json.dumps([record(100 + i) for i in range(n_test)]))
    return tmp_path / "data"


def test_calibrate_study_end_to_end(tmp_path, tokenizer):
    from peftlab.calibrate import Budget, Study, run_study

    data = _task_folder(tmp_path)
    study = Study("arc_e", ["mle", "ens", "blob", "lap"], [1, 2], Budget(steps=2, batch_size=4, micro_batch_size=4,
                                                                          targets=QV), samples=3, members=2,
                  laplace_examples=8)
    summary = run_study(tiny_model(seed=0), tokenizer, study, data, tmp_path / "out", progress=False)
    assert list(summary["table"]) == ["MLE", "ENS (M=2)", "BLoB (N=3)", "BLoB (N=0)", "LAP"]
    assert all(summary["table"][m]["seeds"] == 2 for m in summary["table"])
    for name in ("calibration.json", "calibration.png", "reliability_blob_n_3.png", "ens/seed1/member1/adapter.json",
                 "blob/seed2/adapter.safetensors", "blob/seed2/result.json"):
        assert (tmp_path / "out" / name).exists(), name
    # A finished (method, seed) is not run again: its saved result is read back.
    again = run_study(tiny_model(seed=0), tokenizer, study, data, tmp_path / "out", progress=False)
    assert again["runs"] == summary["runs"]


def test_calibrate_cli_refuses_bad_input(tmp_path, capsys):
    from peftlab.cli import main

    data = _task_folder(tmp_path)
    cases = [(["--task", "arc_e", "--data", str(data), "--methods", "mle,laplace"], "unknown|choose from"),
             (["--task", "arc_e", "--data", str(data), "--seeds", "1,x"], "--seeds"),
             (["--task", "arc_e", "--data", str(data), "--samples", "0"], "--samples must be a positive"),
             (["--task", "arc_c", "--data", str(data)], "no train file"),
             (["--task", "arc_e"], "no data")]
    for argv, message in cases:
        assert main(["calibrate", *argv, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and __import__("re").search(message, err), err
    existing = tmp_path / "o2"
    (existing / "mle" / "seed1").mkdir(parents=True)
    (existing / "mle" / "seed1" / "result.json").write_text("[]")
    assert main(["calibrate", "--task", "arc_e", "--data", str(data), "--output", str(existing)]) == 2
    assert "already holds a calibration study" in capsys.readouterr().err
    assert (existing / "mle" / "seed1" / "result.json").read_text() == "[]"  # nothing lost


def test_blob_config_validation():
    from peftlab.adapters import AdapterConfigError

    for bad in ({"prior_std": 0}, {"eps": -1.0}, {"std_param": "exp"}, {"r": 0}):
        with pytest.raises(AdapterConfigError):
            BlobConfig(**bad)
    BlobConfig(eps=-5.0, std_param="softplus")  # the original code's softplus form takes a negative ε


def test_blob_export_as_plain_peft_is_refused_but_the_mean_exports_as_lora(tmp_path):
    from peftlab.adapters import AdapterConfigError
    from peftlab.io import export_peft

    model = blob_model(std=0.1)
    with pytest.raises((NotImplementedError, AdapterConfigError, Exception), match="Bayesian"):
        export_peft(model, tmp_path / "peft")
    export_peft(model, tmp_path / "lora", as_lora=True)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_embedded_blob_study_data_parses():
    """The five tasks' real files give classification data whose labels are single tokens of the embedded
    tokenizer (WinoGrande has no train split in the shared data: its test file is checked)."""
    from peftlab.calibrate import CLASSIFICATION_TASKS, load_splits
    from peftlab.evaluation.choice import label_prompt
    from peftlab.evaluation.tasks import get_task, load_choice_examples, task_file
    from peftlab.models import load_tokenizer

    root = shared_data("LLM-Adapters/dataset").parent
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    for task in CLASSIFICATION_TASKS:
        if task == "winogrande":
            test_examples = load_choice_examples(get_task(task), task_file(get_task(task), root), 50)
        else:
            _, train_examples, test_examples = load_splits(task, root, 50, 50)
            assert len(train_examples) == 50
        data = classification_data(test_examples, tokenizer)
        assert len(data) == 50 and all(0 <= f["label"] < len(f["choices"]) for f in data)
        for example in test_examples[:10]:
            _, labels = label_prompt(example)
            assert all(len(tokenizer.encode(label, add_special_tokens=False)) == 1 for label in labels), (task, labels)
