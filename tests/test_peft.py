"""PEFT adapter files both ways, checked against PEFT itself on a tiny random Llama."""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
import dora_jax.models.llama
import dora_jax.peft
from dora_jax.models.llama import from_hf, to_hf
from tests.helpers import (
    SIZES,
    adapted_logits,
    hf_llama,
    perturb,
    require_hf,
    tiny_hf_model,
    token_batch,
    torch_logits,
)

require_hf()

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF Llama on disk (untied: lm_head is a kernel too), and its tokens."""
    directory = tmp_path_factory.mktemp("base")
    tiny_hf_model(tied=False).save_pretrained(directory)
    return directory, token_batch(5)


def randomise_peft(model, seed=0):
    """Moves every adapter tensor of a PEFT model away from its init (B != 0, m != ||W||)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "vera_lambda")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


PEFT_CONFIGS = {
    "lora-rslora-patterns": lambda: peft.LoraConfig(
        r=4, lora_alpha=6, use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj", "lm_head"],
        rank_pattern={"v_proj": 2, "model.layers.1.mlp.up_proj": 3}, alpha_pattern={"up_proj": 5},
    ),
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "o_proj", "down_proj"],
    ),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
    # PEFT allows r above min(in, out) (k_proj, v_proj: 32 -> 16); it computes exactly.
    "dora-rank-above-min-dim": lambda: peft.LoraConfig(
        r=20, lora_alpha=16, use_dora=True, target_modules=["k_proj", "v_proj"],
    ),
    "lora-some-layers": lambda: peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1],
    ),
}  # fmt: skip


# Layer-dependent ranks cannot live in one scanned stack: that case is an error, tested below.
CASES = [(n, s) for n in sorted(PEFT_CONFIGS) for s in (False, True)
         if not (s and n == "lora-rslora-patterns")]  # fmt: skip


@pytest.mark.parametrize("name, scan", CASES)
def test_peft_to_dora_jax_gives_peft_logits(base, tmp_path, name, scan):
    directory, tokens = base
    model = peft.get_peft_model(hf_llama(directory), PEFT_CONFIGS[name]())
    randomise_peft(model)
    model.save_pretrained(tmp_path)
    expected = torch_logits(model.eval(), tokens)

    config, params = from_hf(directory, scan_layers=scan)
    adapted = dora_jax.peft.load(tmp_path, params)
    kinds = {type(x).__name__ for x in jax.tree.leaves(adapted, is_leaf=dora_jax.is_adapter)
             if dora_jax.is_adapter(x)}  # fmt: skip
    assert kinds == {"DoRA" if name.startswith("dora") else "VeRA" if name == "vera" else "LoRA"}
    got = adapted_logits(config, adapted, tokens)
    assert np.abs(got - torch_logits(hf_llama(directory), tokens)).max() > 1e-2  # it changed
    np.testing.assert_allclose(got, expected, **TOL)
    # And back: what dora_jax writes, PEFT reads to the same logits.
    dora_jax.peft.save(tmp_path / "again", adapted)
    again = peft.PeftModel.from_pretrained(hf_llama(directory), tmp_path / "again")
    np.testing.assert_allclose(torch_logits(again.eval(), tokens), expected, **TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_save_embedding_layers_loads_and_a_resized_vocabulary_is_refused(tmp_path, tied):
    directory = tmp_path / "base"
    tiny_hf_model(tied=tied).save_pretrained(directory)
    tokens = token_batch(5)
    model = peft.get_peft_model(hf_llama(directory), PEFT_CONFIGS["dora"]())
    randomise_peft(model)
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)  # whole embed, lm_head
    config, params = from_hf(directory)
    got = adapted_logits(config, dora_jax.peft.load(tmp_path / "a", params), tokens)
    np.testing.assert_allclose(got, torch_logits(model.eval(), tokens), **TOL)

    resized = hf_llama(directory)
    resized.resize_token_embeddings(SIZES["vocab_size"] + 8)  # PEFT's "auto" then saves them
    peft.get_peft_model(resized, PEFT_CONFIGS["dora"]()).save_pretrained(tmp_path / "b")
    with pytest.raises(dora_jax.peft.PeftFormatError, match="save_embedding_layers.*from_hf"):
        dora_jax.peft.load(tmp_path / "b", params)
    if tied:  # an lm_head adapter of an untied model has no kernel to go on here
        untied = peft.get_peft_model(
            tiny_hf_model(tied=False), peft.LoraConfig(r=2, target_modules=["lm_head"])
        )
        untied.save_pretrained(tmp_path / "c")
        with pytest.raises(dora_jax.peft.PeftFormatError, match="tie lm_head to embed_tokens"):
            dora_jax.peft.load(tmp_path / "c", params)


def test_rank_pattern_settings_reach_the_nodes(base, tmp_path):
    directory, _ = base
    model = peft.get_peft_model(hf_llama(directory), PEFT_CONFIGS["lora-rslora-patterns"]())
    model.save_pretrained(tmp_path)
    _, params = from_hf(directory)
    adapted = dora_jax.peft.load(tmp_path, params)
    v, up1 = (
        adapted["layers_0"]["self_attn"]["v_proj"]["kernel"],
        adapted["layers_1"]["mlp"]["up_proj"]["kernel"],
    )
    assert v.rank == 2 and v.scale == pytest.approx(6 / np.sqrt(2))
    assert up1.rank == 3 and up1.scale == pytest.approx(5 / np.sqrt(3))
    _, scanned = from_hf(directory, scan_layers=True)
    with pytest.raises(
        dora_jax.peft.PeftFormatError, match="different \\(rank, alpha\\).*scan_layers=False"
    ):
        dora_jax.peft.load(tmp_path, scanned)


def wrapped(params, method, scan):
    rules = None
    if method == "lora":  # rsLoRA with per-module ranks and alphas
        rules = [(r"v_proj", dict(rank=2, alpha=3.0)), (r"layers_1/mlp", dict(rank=3))]
        if scan:
            rules = [(r"v_proj", dict(rank=2, alpha=3.0)), (r"mlp/up", dict(rank=3))]
    kw = dict(rank=8) if method == "vera" else dict(rank=4, alpha=6.0, rslora=method == "lora")
    targets = r"(q_proj|v_proj|up_proj|down_proj|lm_head)/kernel$"
    axes = {r"^layers/": dora_jax.Axes(1, 1)}
    adapted = dora_jax.wrap(params, method=method, targets=targets, axes=axes, rules=rules, **kw)
    return perturb(adapted, size=0.3)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_dora_jax_to_peft_gives_dora_jax_logits(base, tmp_path, method, scan):
    directory, tokens = base
    config, params = from_hf(directory, scan_layers=scan)
    adapted = wrapped(params, method, scan)
    expected = adapted_logits(config, adapted, tokens)
    dora_jax.peft.save(tmp_path, adapted, use_rslora=method == "lora")

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    model = peft.PeftModel.from_pretrained(hf_llama(directory), tmp_path).eval()
    np.testing.assert_allclose(torch_logits(model, tokens), expected, **TOL)
    # The files look as PEFT writes them: same keys and shapes as PEFT's own save.
    model.save_pretrained(tmp_path / "by_peft")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "numpy") as a, safe_open(
        str(tmp_path / "by_peft" / "adapter_model.safetensors"), "numpy"
    ) as b:  # fmt: skip
        # (PEFT also copies lm_head's base weight when lm_head is adapted; not needed.)
        shapes = lambda f: {  # noqa: E731
            k: f.get_slice(k).get_shape() for k in f.keys() if "base_layer" not in k
        }
        assert shapes(a) == shapes(b)
    if method == "lora":
        assert written["use_rslora"] and written["r"] == 4 and written["lora_alpha"] == 6
        layer1 = {r"model\.layers\.1\.mlp\.up_proj": 3, r"model\.layers\.1\.mlp\.down_proj": 3}
        assert written["rank_pattern"] == {"v_proj": 2, **({"up_proj": 3} if scan else layer1)}
        assert written["alpha_pattern"] == {"v_proj": 3}
    if method == "dora":
        assert written["use_dora"] is True
    if method == "vera":
        assert written["peft_type"] == "VERA" and written["save_projection"] is True

    # Merged and written as a plain checkpoint, transformers gives the adapted logits.
    to_hf(tmp_path / "merged", config, dora_jax.merge(adapted))
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, tokens), expected, **TOL)


def test_peft_dora_loaded_then_quantised_keeps_its_magnitudes(base, tmp_path):
    """QDoRA inference of a PEFT adapter: the file's magnitudes over the int8 base."""
    directory, tokens = base
    model = peft.get_peft_model(hf_llama(directory), PEFT_CONFIGS["dora"]())
    randomise_peft(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = torch_logits(model.eval(), tokens)
    config, params = from_hf(directory)
    loaded = dora_jax.peft.load(tmp_path / "adapter", params)
    quantised = dora_jax.quantize_base(loaded, "int8")
    is_adapter = dora_jax.is_adapter
    for before, after in zip(jax.tree.leaves(loaded, is_leaf=is_adapter),
                             jax.tree.leaves(quantised, is_leaf=is_adapter)):  # fmt: skip
        if is_adapter(before):
            np.testing.assert_array_equal(after.magnitude, before.magnitude)
    got = adapted_logits(config, quantised, tokens)

    # Exactly PEFT's adapter over the dequantised kernels (the same file on that checkpoint).
    dequantised = jax.tree.map(
        lambda n: n.base.dequantize() if is_adapter(n) else n, quantised, is_leaf=is_adapter
    )
    to_hf(tmp_path / "dequantised", config, dequantised)
    on_dequantised = peft.PeftModel.from_pretrained(
        hf_llama(tmp_path / "dequantised"), tmp_path / "adapter"
    )
    np.testing.assert_allclose(got, torch_logits(on_dequantised.eval(), tokens), **TOL)
    # Against PEFT on the float base: off by the int8 error carried through the model, which
    # the base model's own change measures (0.13 here; the adapted model 0.09; resetting
    # the magnitudes, as quantize_base did, 3.2).
    base_error = np.abs(
        adapted_logits(config, dequantised, tokens) - adapted_logits(config, params, tokens)
    ).max()
    assert np.abs(got - expected).max() <= 2 * base_error


def test_save_warns_once_for_a_quantised_base(base, tmp_path):
    _, params = from_hf(base[0])
    adapted = dora_jax.wrap(params, rank=2, targets="proj")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dora_jax.peft.save(tmp_path / "float", adapted)
    assert not [w for w in caught if "quantised base" in str(w.message)]
    with pytest.warns(UserWarning) as caught:
        dora_jax.peft.save(tmp_path / "nf4", dora_jax.quantize_base(adapted, "nf4"))
    ours = [w for w in caught if "quantised base" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "(nf4)" in message and "quantisation error" in message
    assert "quantize_base" in message and "dora_jax.merge" in message


def test_dvora_is_saved_with_an_extension_marker_and_refused_as_peft(base, tmp_path):
    directory, _ = base
    _, params = from_hf(directory)
    adapted = dora_jax.wrap(params, rank=8, method="dvora", targets="q_proj")
    dora_jax.peft.save(tmp_path, adapted)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "DVORA" and config["dora_jax_extension"]["method"] == "dvora"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "numpy") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    with pytest.raises(Exception, match="DVORA"):
        peft.PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(dora_jax.peft.PeftFormatError, match="DVoRA has no PEFT semantics"):
        dora_jax.peft.load(tmp_path, params)


def test_save_refuses_what_peft_cannot_express(base, tmp_path):
    _, params = from_hf(base[0])
    mixed = dora_jax.wrap(params, rank=2, targets="proj", rules=[("mlp", dict(method="lora"))])
    with pytest.raises(dora_jax.peft.PeftFormatError, match="mixes \\['DoRA', 'LoRA'\\]"):
        dora_jax.peft.save(tmp_path, mixed)
    magnitude = dora_jax.wrap(params, method="magnitude", targets="q_proj")
    with pytest.raises(dora_jax.peft.PeftFormatError, match="Magnitude adapters have no PEFT"):
        dora_jax.peft.save(tmp_path, magnitude)
    with pytest.raises(dora_jax.peft.PeftFormatError, match="no Hugging Face module name"):
        dora_jax.peft.save(tmp_path, dora_jax.wrap(params, rank=2, targets="q_proj"),
                           name_map=lambda path, index: None)  # fmt: skip


@pytest.mark.parametrize(
    "option, value",
    [
        ("lora_bias", True),
        ("fan_in_fan_out", True),
        ("modules_to_save", ["lm_head"]),
        ("init_lora_weights", "pissa"),
        ("layer_replication", [[0, 1]]),
        ("use_qalora", True),
        ("some_future_option", 3),
    ],
)
def test_load_refuses_options_it_does_not_implement(base, tmp_path, option, value):
    directory, _ = base
    model = peft.get_peft_model(
        hf_llama(directory), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    _, params = from_hf(directory)
    with pytest.raises(dora_jax.peft.PeftFormatError, match=option):
        dora_jax.peft.load(tmp_path, params)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_option_loads_on_a_bias_free_base_and_is_refused_with_biases(base, tmp_path, bias):
    # The Llama has no biases: PEFT's bias="all"/"lora_only" then saves and loads none, and
    # computes plain LoRA. A file that holds biases (of another base) is still refused.
    directory, tokens = base
    model = peft.get_peft_model(
        hf_llama(directory), peft.LoraConfig(r=2, target_modules=["q_proj"], bias=bias)
    )
    randomise_peft(model)
    model.save_pretrained(tmp_path)
    llama_config, params = from_hf(directory)
    adapted = dora_jax.peft.load(tmp_path, params)
    got = adapted_logits(llama_config, adapted, tokens)
    np.testing.assert_allclose(got, torch_logits(model.eval(), tokens), **TOL)
    assert np.abs(got - torch_logits(hf_llama(directory), tokens)).max() > 1e-2  # it changed
    from safetensors.numpy import save_file

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[f"{q}.base_layer.bias"] = np.ones(SIZES["hidden_size"], np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(dora_jax.peft.PeftFormatError, match=f"bias='{bias}'.*holds biases"):
        dora_jax.peft.load(tmp_path, params)


def test_an_lm_head_adapter_of_a_tied_model_says_how_to_load_it(tmp_path):
    # PEFT adapts a tied model's lm_head alone (without ensure_weight_tying): the lookup
    # keeps the base table. That is an untied model whose lm_head is a copy of the table.
    import dataclasses

    tiny_hf_model(tied=True).save_pretrained(tmp_path / "base")
    tokens = token_batch(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warning about the tied lm_head
        model = peft.get_peft_model(
            hf_llama(tmp_path / "base"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
        )
    randomise_peft(model)
    model.save_pretrained(tmp_path / "adapter")
    config, params = from_hf(tmp_path / "base")
    hint = "adapts the output layer alone.*untied params.*ensure_weight_tying=True"
    with pytest.raises(dora_jax.peft.PeftFormatError, match=hint):
        dora_jax.peft.load(tmp_path / "adapter", params)
    # As the message says: untie, the table copied into lm_head.
    config = dataclasses.replace(config, tie_embeddings=False)
    params = {**params, "lm_head": {"kernel": params["embed_tokens"]["embedding"].T}}
    got = adapted_logits(config, dora_jax.peft.load(tmp_path / "adapter", params), tokens)
    np.testing.assert_allclose(got, torch_logits(model.eval(), tokens), **TOL)


def test_fan_in_fan_out_is_accepted_with_a_name_map_for_conv1d_models(base, tmp_path):
    # With a user name_map (say a GPT-2-style model), fan_in_fan_out only describes the base
    # weight's storage: the adapter tensors mean the same update, and load reads them.
    directory, tokens = base
    model = peft.get_peft_model(
        hf_llama(directory), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    randomise_peft(model)
    model.save_pretrained(tmp_path)
    expected = torch_logits(model.eval(), tokens)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    llama_config, params = from_hf(directory)
    name_map = dora_jax.models.llama.hf_module_name
    adapted = dora_jax.peft.load(tmp_path, params, name_map=name_map)
    np.testing.assert_allclose(adapted_logits(llama_config, adapted, tokens), expected, **TOL)


def test_load_of_a_folder_that_is_not_an_adapter_says_why(base, tmp_path):
    directory, tokens = base
    _, params = from_hf(directory)
    model = peft.get_peft_model(hf_llama(directory), PEFT_CONFIGS["dora"](), adapter_name="mine")
    model.save_pretrained(tmp_path / "named")  # PEFT puts a named adapter in a subfolder
    with pytest.raises(dora_jax.peft.PeftFormatError, match=r"subfolders \['mine'\]"):
        dora_jax.peft.load(tmp_path / "named", params)
    dora_jax.peft.load(tmp_path / "named" / "mine", params)  # as the message says
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(dora_jax.peft.PeftFormatError, match="adapter_model.bin"):
        dora_jax.peft.load(tmp_path / "bin" / "mine", params)
    config = tmp_path / "named" / "mine" / "adapter_config.json"
    for text, message in (("[1, 2]", "JSON list"), ('{"peft_type": "LO', "not valid JSON")):
        config.write_text(text)
        with pytest.raises(dora_jax.peft.PeftFormatError, match=message):
            dora_jax.peft.load(config.parent, params)


def test_load_refuses_unmappable_modules_and_another_base(base, tmp_path):
    directory, _ = base
    _, params = from_hf(directory)
    # An adapter trained on a wider model does not fit this one.
    other = tiny_hf_model(tied=False, hidden_size=48, intermediate_size=64)
    peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "wide"
    )
    with pytest.raises(dora_jax.peft.PeftFormatError, match="another base model"):
        dora_jax.peft.load(tmp_path / "wide", params)
    # A module this Llama does not have.
    deeper = tiny_hf_model(tied=False, num_hidden_layers=3)
    peft.get_peft_model(deeper, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "deep"
    )
    with pytest.raises(dora_jax.peft.PeftFormatError, match="model.layers.2.self_attn.q_proj"):
        dora_jax.peft.load(tmp_path / "deep", params)


def test_peft_dora_on_a_bf16_checkpoint(tmp_path):
    """A bf16 base read as stored (bf16 params) takes a PEFT DoRA adapter exactly."""
    model = tiny_hf_model(tied=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    # The reference: PEFT on the same bf16 values held in float32.
    base32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])
    peft_model = peft.get_peft_model(base32, config)
    randomise_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    tokens = token_batch(3)
    expected = torch_logits(peft_model.eval(), tokens)

    llama_config, params = from_hf(tmp_path / "base", scan_layers=True)
    assert params["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    adapted = dora_jax.peft.load(tmp_path / "adapter", params)
    np.testing.assert_allclose(adapted_logits(llama_config, adapted, tokens), expected, **TOL)


@pytest.mark.parametrize("use_dora", [False, True])
def test_name_map_carries_adapters_of_any_model_both_ways(tmp_path, use_dora):
    """A Flax MLP and its torch twin: a two-line name_map is all PEFT interchange needs."""
    from tests.helpers import MLP

    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    params = MLP().init(jax.random.key(0), jnp.asarray(x))["params"]

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(12, 16), torch.nn.Linear(16, 5)

        def forward(self, h):
            return self.fc2(torch.tanh(self.fc1(h)))

    def twin():
        model = TorchMLP()
        with torch.no_grad():
            for name in ("fc1", "fc2"):
                getattr(model, name).weight.copy_(
                    torch.tensor(np.asarray(params[name]["kernel"]).T)
                )
                getattr(model, name).bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
        return model

    def name_map(path, index):  # "fc1/kernel" <-> torch module "fc1"
        return path.split("/")[0] if path.endswith("/kernel") else None

    def torch_out(model):
        with torch.no_grad():
            return model(torch.tensor(x)).numpy()

    forward = dora_jax.apply(MLP().apply)
    # PEFT -> dora_jax
    peft_model = peft.get_peft_model(
        twin(), peft.LoraConfig(r=2, lora_alpha=3, use_dora=use_dora, target_modules=["fc1", "fc2"])
    )
    randomise_peft(peft_model)
    assert np.abs(torch_out(peft_model.eval()) - torch_out(twin())).max() > 1e-2
    peft_model.save_pretrained(tmp_path / "from_peft")
    adapted = dora_jax.peft.load(tmp_path / "from_peft", params, name_map=name_map)
    np.testing.assert_allclose(
        forward({"params": adapted}, x), torch_out(peft_model.eval()), atol=1e-5, rtol=1e-5
    )
    # dora_jax -> PEFT
    mine = perturb(dora_jax.wrap(params, rank=3, method="dora" if use_dora else "lora"), size=0.3)
    dora_jax.peft.save(tmp_path / "to_peft", mine, name_map=name_map)
    loaded = peft.PeftModel.from_pretrained(twin(), tmp_path / "to_peft").eval()
    np.testing.assert_allclose(
        torch_out(loaded), forward({"params": mine}, x), atol=1e-5, rtol=1e-5
    )


# --- embedding tables, target_modules, name_map indices, fan_in_fan_out, MiCA -------------


def peft_loads_cleanly(base_model, directory):
    """PEFT's model of ``directory`` over ``base_model``; asserts that PEFT reads every tensor
    of the file into a module and misses none (no warnings about keys, fan_in_fan_out or
    tying)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base_model, directory).eval()
    noisy = ("missing adapter keys", "fan_in_fan_out", "tie_word_embeddings", "inconsistency")
    assert not [str(w.message) for w in caught if any(n in str(w.message) for n in noisy)]
    with safe_open(str(directory / "adapter_model.safetensors"), "numpy") as f:
        written = set(f.keys())
    assert not written - set(peft.get_peft_model_state_dict(model))  # no unexpected keys
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_embedding_adapters_use_peft_embedding_format_both_ways(base, tmp_path, method):
    directory, tokens = base  # untied: the table is only looked up
    config, params = from_hf(directory)
    targets = r"(embed_tokens/embedding|q_proj/kernel)$"
    adapted = perturb(dora_jax.wrap(params, rank=2, method=method, targets=targets), size=0.3)
    expected = adapted_logits(config, adapted, tokens)
    dora_jax.peft.save(tmp_path / "mine", adapted)
    with safe_open(str(tmp_path / "mine" / "adapter_model.safetensors"), "numpy") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if "embed" in k}
    embed = "base_model.model.model.embed_tokens."
    vocab, dim = SIZES["vocab_size"], SIZES["hidden_size"]
    want = {embed + "lora_embedding_A": [2, vocab], embed + "lora_embedding_B": [dim, 2]}
    if method == "dora":
        want[embed + "lora_magnitude_vector"] = [dim]
    assert shapes == want
    model = peft_loads_cleanly(hf_llama(directory), tmp_path / "mine")
    np.testing.assert_allclose(torch_logits(model, tokens), expected, **TOL)
    back = dora_jax.peft.load(tmp_path / "mine", params)
    np.testing.assert_allclose(adapted_logits(config, back, tokens), expected, **TOL)

    # PEFT's own embedding adapter (with the table it saves beside it) loads to its logits.
    lora = peft.LoraConfig(r=3, lora_alpha=5, use_dora=method == "dora",
                           target_modules=["embed_tokens", "v_proj"])  # fmt: skip
    theirs = peft.get_peft_model(hf_llama(directory), lora)
    randomise_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    got = adapted_logits(config, dora_jax.peft.load(tmp_path / "theirs", params), tokens)
    np.testing.assert_allclose(got, torch_logits(theirs.eval(), tokens), **TOL)


def test_tied_embedding_lora_is_saved_with_weight_tying_and_dora_refused(tmp_path):
    """The tied Llama's logits use the adapted table (attend); PEFT's tied lm_head sees the
    embedding's update only with ensure_weight_tying, and only for LoRA."""
    tiny_hf_model(tied=True).save_pretrained(tmp_path / "base")
    tokens = token_batch(5)
    config, params = from_hf(tmp_path / "base")
    targets = r"(embed_tokens/embedding|q_proj/kernel)$"
    lora = perturb(dora_jax.wrap(params, rank=2, method="lora", targets=targets), size=0.3)
    expected = adapted_logits(config, lora, tokens)
    dora_jax.peft.save(tmp_path / "lora", lora)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())[
        "ensure_weight_tying"
    ]
    model = peft_loads_cleanly(hf_llama(tmp_path / "base"), tmp_path / "lora")
    np.testing.assert_allclose(torch_logits(model, tokens), expected, **TOL)
    back = dora_jax.peft.load(tmp_path / "lora", params)
    np.testing.assert_allclose(adapted_logits(config, back, tokens), expected, **TOL)
    dora = dora_jax.wrap(params, rank=2, method="dora", targets=targets)
    with pytest.raises(dora_jax.peft.PeftFormatError, match="magnitude of its own"):
        dora_jax.peft.save(tmp_path / "dora", dora)

    def peft_file(name, **kw):
        lora_config = peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's own warning about tying
            theirs = peft.get_peft_model(hf_llama(tmp_path / "base"), lora_config)
        randomise_peft(theirs)
        theirs.save_pretrained(tmp_path / name)
        return theirs.eval()

    theirs = peft_file("tied", ensure_weight_tying=True)
    got = adapted_logits(config, dora_jax.peft.load(tmp_path / "tied", params), tokens)
    np.testing.assert_allclose(got, torch_logits(theirs, tokens), **TOL)
    peft_file("untied_lookup")  # PEFT's lm_head keeps the base table: not dora_jax's maths
    with pytest.raises(dora_jax.peft.PeftFormatError, match="ensure_weight_tying"):
        dora_jax.peft.load(tmp_path / "untied_lookup", params)
    peft_file("tied_dora", ensure_weight_tying=True, use_dora=True)
    with pytest.raises(dora_jax.peft.PeftFormatError, match="magnitude of its own"):
        dora_jax.peft.load(tmp_path / "tied_dora", params)


@pytest.mark.parametrize("use_dora", [False, True])
def test_embedding_tables_of_any_model_with_a_name_map(tmp_path, use_dora):
    """A torch Embedding + Linear and a plain-jnp twin whose table is not named embedding."""

    class TorchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)  # every instance has the same weights
            self.tok, self.out = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 4)

        def forward(self, ids):
            return self.out(torch.tanh(self.tok(ids)))

    net = TorchEmbed().eval()
    params = {"tok": {"weight": jnp.asarray(net.tok.weight.detach().numpy())},
              "out": {"kernel": jnp.asarray(net.out.weight.detach().numpy().T),
                      "bias": jnp.asarray(net.out.bias.detach().numpy())}}  # fmt: skip
    ids = np.random.default_rng(0).integers(0, 10, (3, 5))
    forward = dora_jax.apply(
        lambda p, i: jnp.tanh(p["tok"]["weight"][i]) @ p["out"]["kernel"] + p["out"]["bias"]
    )
    name_map = lambda path, index: path.split("/")[0]  # noqa: E731
    method = "dora" if use_dora else "lora"
    mine = perturb(
        dora_jax.wrap(params, rank=2, method=method, targets="(weight|kernel)$"), size=0.3
    )
    with pytest.raises(dora_jax.peft.PeftFormatError, match="tied="):
        dora_jax.peft.save(tmp_path / "mine", mine, name_map=name_map, embeddings="tok/weight$")
    dora_jax.peft.save(
        tmp_path / "mine", mine, name_map=name_map, embeddings="tok/weight$", tied={}
    )
    loaded = peft_loads_cleanly(TorchEmbed().eval(), tmp_path / "mine")
    with torch.no_grad():
        torch_out = loaded(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(torch_out, forward(mine, ids), atol=1e-5, rtol=1e-5)

    theirs = peft.get_peft_model(
        net, peft.LoraConfig(r=2, use_dora=use_dora, target_modules=["tok", "out"])
    )
    randomise_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(dora_jax.peft.PeftFormatError, match="tied="):
        dora_jax.peft.load(tmp_path / "theirs", params, name_map=name_map)
    adapted = dora_jax.peft.load(tmp_path / "theirs", params, name_map=name_map, tied={})
    with torch.no_grad():
        expected = theirs.eval()(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(forward(adapted, ids), expected, atol=1e-5, rtol=1e-5)


class Blocks(torch.nn.Module):
    """Two residual blocks, each a projection and an nn.Sequential MLP, and a head whose
    name ends like the projections'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        linear = torch.nn.Linear
        block = lambda: torch.nn.ModuleDict(dict(  # noqa: E731
            proj=linear(8, 8),
            mlp=torch.nn.Sequential(linear(8, 16), torch.nn.Tanh(), linear(16, 8)),
        ))  # fmt: skip
        self.blocks = torch.nn.ModuleList([block(), block()])
        self.head = torch.nn.ModuleDict(dict(proj=torch.nn.Linear(8, 3)))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["proj"](x)
            x = x + b["mlp"](x)
        return self.head["proj"](x)


def blocks_params(net):
    """Blocks' weights as a Flax-layout tree: blocks_0/mlp_2/kernel is blocks.0.mlp.2."""
    out = {}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):
            node = out
            for part in name.replace("blocks.", "blocks_").replace("mlp.", "mlp_").split("."):
                node = node.setdefault(part, {})
            node["kernel"] = jnp.asarray(module.weight.detach().numpy().T)
            node["bias"] = jnp.asarray(module.bias.detach().numpy())
    return out


def blocks_forward(p, x):
    dense = lambda q, h: h @ q["kernel"] + q["bias"]  # noqa: E731
    for i in (0, 1):
        b = p[f"blocks_{i}"]
        x = x + dense(b["proj"], x)
        x = x + dense(b["mlp_2"], jnp.tanh(dense(b["mlp_0"], x)))
    return dense(p["head"]["proj"], x)


@pytest.mark.parametrize("method", ["lora", "vera"])
@pytest.mark.parametrize("targets", ["mlp_", "blocks_./proj"])
def test_target_modules_of_a_name_map_are_the_adapted_modules_only(tmp_path, method, targets):
    """A name_map that names only the adapted kernels: a last name ("proj", "0") would
    also select head.proj or the block blocks.0 in PEFT."""
    net = Blocks().eval()
    params = blocks_params(net)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(blocks_forward(params, x), net(torch.tensor(x)).numpy(),
                                   atol=1e-5)  # fmt: skip

    def name_map(path, index):  # blocks_1/mlp_2/kernel -> blocks.1.mlp.2; the rest unnamed
        if not re.search(targets, path) or not path.endswith("/kernel"):
            return None
        return path[: -len("/kernel")].replace("_", ".").replace("/", ".")

    mine = perturb(dora_jax.wrap(params, rank=2, method=method, targets=targets), size=0.3)
    dora_jax.peft.save(tmp_path, mine, name_map=name_map)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert all(name.startswith("blocks.") for name in written)
    model = peft_loads_cleanly(net, tmp_path)
    with torch.no_grad():
        torch_out = model(torch.tensor(x)).numpy()
    forward = dora_jax.apply(blocks_forward)
    np.testing.assert_allclose(torch_out, forward(mine, x), atol=1e-5, rtol=1e-5)


def test_save_calls_name_map_with_each_kernels_own_stack_index(base, tmp_path):
    directory, tokens = base
    config, params = from_hf(directory, scan_layers=True)

    def name_map(path, index):  # written for the scanned layers: index[0] is the layer
        parts = path.split("/")
        if parts[0] != "layers" or parts[-1] != "kernel":
            return None
        return f"model.layers.{index[0]}." + ".".join(parts[1:-1])

    axes = {r"^layers/": dora_jax.Axes(1, 1)}
    adapted = perturb(dora_jax.wrap(params, rank=2, targets="q_proj", axes=axes), size=0.3)
    dora_jax.peft.save(tmp_path, adapted, name_map=name_map)
    model = peft_loads_cleanly(hf_llama(directory), tmp_path)
    np.testing.assert_allclose(
        torch_logits(model, tokens), adapted_logits(config, adapted, tokens), **TOL
    )


def test_save_writes_fan_in_fan_out_for_conv1d_bases(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out), as Flax does: only the config differs."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)

    class TorchConv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(16, 8)  # (nf=out, nx=in): weight (8, 16)

        def forward(self, h):
            return self.c_fc(h)

    net = TorchConv1D().eval()
    params = {"c_fc": {"kernel": jnp.asarray(net.c_fc.weight.detach().numpy()),
                       "bias": jnp.asarray(net.c_fc.bias.detach().numpy())}}  # fmt: skip
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    mine = perturb(dora_jax.wrap(params, rank=2), size=0.3)
    name_map = lambda path, index: "c_fc" if path == "c_fc/kernel" else None  # noqa: E731
    dora_jax.peft.save(tmp_path, mine, name_map=name_map, fan_in_fan_out=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = peft_loads_cleanly(net, tmp_path)
    with torch.no_grad():
        torch_out = model(torch.tensor(x)).numpy()
    forward = dora_jax.apply(lambda p, h: h @ p["c_fc"]["kernel"] + p["c_fc"]["bias"])
    np.testing.assert_allclose(torch_out, forward(mine, x), atol=1e-5, rtol=1e-5)


def test_mica_adapter_loads_as_the_plain_lora_it_computes(base, tmp_path):
    """MiCA initialises B from the base's minor singular vectors and A = 0; the base is
    untouched and the forward is plain LoRA."""
    directory, tokens = base
    lora = peft.LoraConfig(r=2, init_lora_weights="mica", target_modules=["k_proj"])
    model = peft.get_peft_model(hf_llama(directory), lora)
    randomise_peft(model)
    model.save_pretrained(tmp_path)
    config, params = from_hf(directory)
    got = adapted_logits(config, dora_jax.peft.load(tmp_path, params), tokens)
    np.testing.assert_allclose(got, torch_logits(model.eval(), tokens), **TOL)
