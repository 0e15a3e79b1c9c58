"""Laplace-LoRA (peftlab/laplace.py): Jacobians, the K-FAC posterior against a dense computation, the
prior precision and the predictive."""
import pytest
import torch

from peftlab.adapters import LoraConfig
from peftlab.calibrate import classification_data, collate_classification, label_logits
from peftlab.evaluation.choice import ChoiceExample
from peftlab.inject import add_adapter, adapter_layers
from peftlab.laplace import LaplaceLoRA
from peftlab.models import tiny_model

TARGET = r"model\.layers\.1\.self_attn\.v_proj"  # one small adapted layer, so dense checks are cheap


@pytest.fixture
def model():
    model = tiny_model(seed=0)
    add_adapter(model, LoraConfig(r=2, alpha=4, target_modules=TARGET), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture
def data(tokenizer):
    options = ("red", "green", "blue", "yellow")
    examples = [ChoiceExample(f"colour {i} {'is' * (i % 3)}?", options[:2 + i % 3], i % 2) for i in range(10)]
    return classification_data(examples, tokenizer)


def lora_of(model):
    (_, layer), = adapter_layers(model)
    return layer.adapters["default"]


def dense_jacobian(model, feature):
    """∂z_c/∂vec(A), ∂z_c/∂vec(B) for one example by autograd, vec column-stacking: C × params."""
    lora = lora_of(model)
    batch = collate_classification([feature], 0)
    rows = []
    for c in range(len(feature["choices"])):
        z = label_logits(model, batch)[0, c]
        ga, gb = torch.autograd.grad(z, [lora.lora_A, lora.lora_B])
        rows.append(torch.cat([ga.t().reshape(-1), gb.t().reshape(-1)]))
    return torch.stack(rows)


def test_jacobians_match_autograd(model, data):
    posterior = LaplaceLoRA(model)
    batch = collate_classification(data[:4], 0)
    _, stats = posterior._jacobians(batch)
    (name, _, _), = posterior.layers
    jac_a, jac_b = stats[name]["A"][0], stats[name]["B"][0]
    for n, feature in enumerate(data[:4]):
        dense = dense_jacobian(model, feature)
        for c in range(len(feature["choices"])):
            ours = torch.cat([jac_a[c, n].t().reshape(-1), jac_b[c, n].t().reshape(-1)])
            assert torch.allclose(ours, dense[c], atol=1e-5), (n, c)


def test_function_covariance_matches_the_dense_kfac_posterior(model, data):
    posterior = LaplaceLoRA(model).fit(data, 0, batch_size=4)
    assert posterior.n == len(data) and posterior.prior_precision > 0
    (name, _, _), = posterior.layers
    blocks = []
    for which in ("A", "B"):
        f = posterior.factors[(name, which)]
        a_in = f.q_in @ torch.diag(f.l_in) @ f.q_in.t()
        g_out = f.q_out @ torch.diag(f.l_out) @ f.q_out.t()
        hessian = torch.kron(a_in.double(), g_out.double()) / posterior.n  # vec column-stacking: in ⊗ out
        blocks.append(torch.linalg.inv(hessian + posterior.prior_precision * torch.eye(hessian.shape[0],
                                                                                      dtype=torch.float64)))
    sigma = torch.block_diag(*blocks)
    batch = collate_classification(data[:3], 0)
    _, cov = posterior.function_covariance(batch)
    for n, feature in enumerate(data[:3]):
        jac = dense_jacobian(model, feature).double()
        expected = jac @ sigma @ jac.t()
        c = len(feature["choices"])
        assert torch.allclose(cov[n, :c, :c].double(), expected, rtol=1e-3, atol=1e-6)


def test_prior_precision_maximises_the_evidence_and_a_tight_prior_gives_the_map_softmax(model, data):
    posterior = LaplaceLoRA(model).fit(data, 0)
    best = posterior.prior_precision
    assert posterior.log_evidence(best) >= max(posterior.log_evidence(best * 1.2), posterior.log_evidence(best / 1.2))
    posterior.prior_precision = 1e12  # no posterior spread: the predictive is the MAP model's softmax
    probs = posterior.predict(data, 0, samples=2000)
    with torch.no_grad():
        z = label_logits(model, collate_classification(data, 0))
    assert (probs - torch.softmax(z.double(), -1).nan_to_num()).abs().max() < 1e-4
    posterior.prior_precision = 1e-3
    wide = posterior.predict(data, 0, samples=2000)
    assert (wide - probs).abs().max() > 1e-2  # a wide posterior moves the predictive away from the MAP softmax
    assert torch.allclose(wide.sum(1), torch.ones(len(data), dtype=torch.float64))


def test_laplace_refuses_other_adapters():
    from peftlab.adapters import BlobConfig

    model = tiny_model(seed=0)
    add_adapter(model, BlobConfig(target_modules=TARGET))
    with pytest.raises(ValueError, match="plain LoRA"):
        LaplaceLoRA(model)
