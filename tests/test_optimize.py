"""optimize() end to end on tiny real Llama / Mistral / GPT-2 models."""

import pytest
import torch
from models import LAYERS, batch, norms_covered, tiny_causal_lm, train_losses

from kernels.rmsnorm import rmsnorm_reference
from patterns.norms import hf_rmsnorm, rmsnorm_guard
from rewriter import GraftError, Pattern, optimize, register_pattern_file, report

# 5 AdamW steps of the optimized model against its unoptimized twin (same seed, same batches):
# the largest relative difference in any step's loss. fp32 differs only by rounding order.
STEP_LOSS_BOUND = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def assert_same_training(a, b, dtype):
    la, lb = train_losses(a), train_losses(b)
    for step, (x, y) in enumerate(zip(la, lb)):
        assert abs(x - y) <= STEP_LOSS_BOUND[dtype] * abs(x), f"step {step}: {x} vs {y}"


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_everywhere_verified_and_trains_like_the_twin(model_type, lora, dtype):
    twin = tiny_causal_lm(model_type, lora=lora, dtype=dtype)
    model = tiny_causal_lm(model_type, lora=lora, dtype=dtype)
    assert optimize(model) is model
    rep = report(model)
    assert norms_covered(rep) == 2 * LAYERS + 1
    assert rep.verified, str(rep)
    assert not rep.fallbacks
    modules = {(m.pattern, m.module) for m in rep.matches}
    assert ("rmsnorm", "model.norm") in modules
    # with LoRA the decoder layers' norms are the prologue of the fused q/k/v and MLP nodes
    layer_norm = ("rmsnorm_lora_qkv", "model.layers.1") if lora else ("rmsnorm", "model.layers.1.input_layernorm")
    assert layer_norm in modules
    assert_same_training(twin, model, dtype)


def test_trainable_norm_weights_get_the_same_gradients():
    twin = tiny_causal_lm("llama", lora=False)
    model = optimize(tiny_causal_lm("llama", lora=False))
    for m in (twin, model):
        m.train()
        m(**batch(7)).loss.backward()
    norms = [n for n, _ in twin.named_parameters() if "norm" in n]
    assert len(norms) == 2 * LAYERS + 1
    for name in norms:
        a, b = twin.get_parameter(name).grad, model.get_parameter(name).grad
        assert b is not None and b.abs().sum() > 0, name
        assert ((a - b).norm() / a.norm()).item() < 1e-5, name


def test_outputs_for_callers_are_unchanged():
    twin = tiny_causal_lm("llama")
    model = optimize(tiny_causal_lm("llama"))
    ids = batch(3)["input_ids"]
    for mode in ("train", "eval"):
        getattr(twin, mode)()
        getattr(model, mode)()
        a, b = twin(input_ids=ids), model(input_ids=ids)
        assert b.loss is None and b.logits.shape == a.logits.shape
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :5]
    assert torch.equal(
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
        twin.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
    )


def test_new_lengths_settle_on_one_dynamic_graph():
    model = optimize(tiny_causal_lm("llama"))
    model.train()
    for length in (11, 23, 37, 50):
        model(**batch(length, length=length)).loss.backward()
    # the sample's static graph, then one dynamic graph for every other length
    assert report(model).graphs == 2


def test_many_models_in_one_process_each_get_their_own_graphs():
    """Dynamo's recompile limit (8 per code object) must not silently skip later models."""
    for seed in range(9):
        model = optimize(tiny_causal_lm("llama", seed=seed))
        assert norms_covered(report(model)) == 2 * LAYERS + 1
        model.train()
        model(**batch(seed)).loss.backward()
        assert not report(model).fallbacks


def test_unsupported_model_is_left_alone_and_the_report_says_why():
    model = tiny_causal_lm("gpt2", lora=False)
    assert optimize(model) is model
    assert "forward" not in model.__dict__
    rep = report(model)
    assert rep.counts() == {} and not rep.verified
    assert "no pattern set applies to 'gpt2'" in rep.fallbacks[0].reason
    with pytest.raises(GraftError, match="no pattern set applies to 'gpt2'"):
        optimize(tiny_causal_lm("gpt2", lora=False), strict=True)


def test_unsupported_dtype_falls_back_per_module_with_the_reason():
    model = tiny_causal_lm("llama", dtype=torch.float64)
    optimize(model)
    rep = report(model)
    assert rep.counts()["rmsnorm"] == 0
    norms = [f for f in rep.fallbacks if f.pattern == "rmsnorm"]
    assert len(norms) == 2 * LAYERS + 1
    assert all("unsupported dtypes torch.float64" in f.reason for f in norms)
    # the kernels that do not take float64 are not used on it (the fused loss does take it)
    assert all(n == 0 for name, n in rep.counts().items() if name != "linear_cross_entropy")
    with pytest.raises(GraftError, match="unsupported dtypes"):
        optimize(tiny_causal_lm("llama", dtype=torch.float64), strict=True)


def off_by_one_percent(hidden_states, weight, *, variance_epsilon, dtype):
    return rmsnorm_reference(hidden_states, weight, variance_epsilon) * 1.01


def raises(hidden_states, weight, *, variance_epsilon, dtype):
    raise ValueError("kernel exploded")


@pytest.mark.parametrize("replace, why", [(off_by_one_percent, "verification failed"), (raises, "kernel exploded")])
def test_a_wrong_replacement_is_caught_reverted_and_reported(replace, why):
    wrong = Pattern(
        name="wrong_rmsnorm",
        search=hf_rmsnorm,
        inputs={"hidden_states": ("T", "H"), "weight": ("H",)},
        replace=replace,
        guard=rmsnorm_guard,
    )
    twin = tiny_causal_lm("llama")
    model = optimize(tiny_causal_lm("llama"), patterns=[wrong])
    rep = report(model)
    assert rep.counts()["wrong_rmsnorm"] == 0
    assert len(rep.matches) == 2 * LAYERS + 1
    assert all(m.status == "reverted" and why in m.reason for m in rep.matches)
    assert rep.whole_model.passed and rep.verified  # what runs now (the original path) is verified
    assert why in str(rep)
    assert_same_training(twin, model, torch.float32)
    with pytest.raises(GraftError, match=why):
        optimize(tiny_causal_lm("llama"), patterns=[wrong], strict=True)


USER_PATTERN_FILE = """
import torch.nn.functional as F
from rewriter import Pattern, register_pattern

def silu_times(gate, up):
    return F.silu(gate) * up

def fused(gate, up):
    return F.silu(gate) * up

register_pattern(
    Pattern(name="user_silu_mul", search=silu_times, inputs={"gate": ("T", "I"), "up": ("T", "I")}, replace=fused),
    model_types=["llama"],
)
"""


def test_a_user_pattern_file_outside_the_package_is_matched(tmp_path, clean_registry):
    path = tmp_path / "my_patterns.py"
    path.write_text(USER_PATTERN_FILE)
    register_pattern_file(path)
    model = optimize(tiny_causal_lm("llama"))
    rep = report(model)
    assert rep.counts()["user_silu_mul"] == LAYERS
    assert rep.verified
    assert {m.module for m in rep.matches if m.pattern == "user_silu_mul"} == {
        f"model.layers.{i}.mlp" for i in range(LAYERS)
    }


def test_verify_false_still_captures_and_reports():
    model = optimize(tiny_causal_lm("llama"), verify=False)
    rep = report(model)
    assert norms_covered(rep) == 2 * LAYERS + 1
    assert all(m.status == "unverified" for m in rep.matches)
    assert not rep.verified


def test_report_json_and_table():
    import json

    model = optimize(tiny_causal_lm("llama", dtype=torch.bfloat16))
    rep = report(model)
    data = json.loads(rep.to_json())
    assert norms_covered(rep) == 2 * LAYERS + 1 and data["verified"] is True
    assert data["counts"]["rmsnorm_lora_qkv"] == LAYERS
    norm = next(m for m in data["matches"] if m["pattern"] == "rmsnorm")
    assert norm["module"] == "model.norm" and norm["status"] == "applied"
    assert data["matches"][0]["comparisons"]
    # eager keeps an fp32 copy of each bf16 norm input for backward; we keep one fp32 per row
    assert rep.activation_bytes_saved > 0
    text = str(rep)
    assert "rmsnorm" in text and "verified" in text
    assert "model.layers.0" in rep.details()


def test_optimizing_twice_starts_from_the_original_forward():
    twin = tiny_causal_lm("llama")
    model = optimize(optimize(tiny_causal_lm("llama"), patterns=["rmsnorm"]))
    assert norms_covered(report(model)) == 2 * LAYERS + 1 and report(model).verified
    assert model.get_base_model().forward.graft_original.__self__ is model.get_base_model()
    assert_same_training(twin, model, torch.float32)


def test_a_deep_copy_trains_its_own_parameters_unoptimized_and_can_be_optimized_again():
    import copy

    twin = tiny_causal_lm("llama")
    model = optimize(tiny_causal_lm("llama"), patterns=["rmsnorm"])
    with pytest.warns(UserWarning, match="copy of an optimized model"):
        clone = copy.deepcopy(model)
        assert_same_training(twin, clone, torch.float32)
    assert all(p.grad is None for p in model.parameters())  # the original was not touched
    clone = optimize(clone, patterns=["rmsnorm"])
    assert report(clone).verified and report(clone).counts()["rmsnorm"] == 2 * LAYERS + 1
    assert clone.get_base_model().forward.graft_original.__self__ is clone.get_base_model()
    assert_same_training(twin, clone, torch.float32)
