"""Family image layouts: forced-token tables, token <-> code maps, prompt templates, CFG prompts.

Most tests use light `Model` objects (config + vocabulary + a tokenizer.json folder, no
parameters); the torch-marked ones build tiny random checkpoints in the real file layouts,
give them the layout vocabulary and a tokenizer, import them with `convert import` and
check that the loaded models give the same plans and prompts.
"""

import json
import types
from pathlib import Path

import numpy as np
import pytest

from sjd2_jax import families
from sjd2_jax.api import Model
from sjd2_jax.families import chameleon, emu3
from sjd2_jax.model.config import ModelConfig

from synthetic import (
    emu3_layout_vocabulary,
    janus_vocabulary,
    lumina_vocabulary,
    write_tokenizer,
)

V_LM, V_JANUS, N_CODES = 300, 128, 16


def _config(family):
    if family == "janus":
        return ModelConfig(
            family="janus",
            vocab_size=V_JANUS,
            hidden_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            intermediate_size=8,
            image_vocab_size=N_CODES,
            image_embed_dim=4,
        )
    return ModelConfig(
        family=family,
        vocab_size=V_LM,
        hidden_size=8,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        intermediate_size=8,
        qk_norm=family == "chameleon",
    )


VOCABS = {
    "chameleon": lambda: lumina_vocabulary(V_LM),
    "emu3": lambda: emu3_layout_vocabulary(V_LM),
    "janus": lambda: janus_vocabulary(V_JANUS),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> Model with a tokenizer; family + '_notok' -> same vocabulary, no tokenizer."""
    out = {}
    for fam, make in VOCABS.items():
        vm = make()
        folder = tmp_path_factory.mktemp(fam)
        write_tokenizer(folder, vm)
        hf = {"vq_config": {"num_patches": 4}} if fam == "janus" else {"vocabulary_map": vm}
        out[fam] = Model(_config(fam), None, path=folder, hf_config=hf)
        bare = tmp_path_factory.mktemp(fam + "_notok")
        out[fam + "_notok"] = Model(_config(fam), None, path=bare, hf_config=hf)
    return out


def _vocab(model):
    return families.vocabulary(model)


def _text(model, ids):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model.path) / "tokenizer.json"))
    return tok.decode(list(ids), skip_special_tokens=False)


def _check_grid(plan, eol, tail):
    """forced = h rows of (w free, EOL) then the tail tokens; free count h*w."""
    h, w = plan.height, plan.width
    assert plan.forced.dtype == np.int32 and plan.num_generated == h * (w + 1) + len(tail)
    grid = plan.forced[: h * (w + 1)].reshape(h, w + 1)
    assert (grid[:, :w] == -1).all()
    assert (grid[:, w] == eol).all()
    assert plan.forced[h * (w + 1) :].tolist() == list(tail)
    assert plan.free.sum() == h * w


def _check_codes(plan, vocab, code_of_name):
    image = {i: code_of_name(n) for n, i in vocab.items() if code_of_name(n) is not None}
    assert plan.allowed.dtype == bool and plan.allowed.shape == (plan.vocab_out,)
    assert set(np.flatnonzero(plan.allowed).tolist()) == set(image)
    assert plan.code_of_token.dtype == np.int32
    for i in range(plan.vocab_out):
        assert plan.code_of_token[i] == image.get(i, -1)
    for c, t in enumerate(plan.token_of_code):
        if t >= 0:
            assert plan.code_of_token[t] == c
    # tokens <-> codes round trip, with and without the prefix
    rng = np.random.default_rng(0)
    valid = np.flatnonzero(plan.token_of_code >= 0)
    codes = rng.choice(valid, size=(3, plan.height, plan.width))
    toks = plan.codes_to_tokens(codes)
    assert toks.shape == (3, plan.num_generated)
    assert (toks[:, ~plan.free] == plan.forced[~plan.free]).all()
    assert plan.allowed[toks[:, plan.free]].all()
    np.testing.assert_array_equal(plan.tokens_to_codes(toks), codes)
    full = plan.codes_to_tokens(codes, include_prefix=True)
    assert full.shape == (3, plan.total_tokens)
    assert (full[:, : len(plan.prefix)] == np.array(plan.prefix)).all()
    np.testing.assert_array_equal(plan.tokens_to_codes(full), codes)


# ----------------------------------------------------------------------------- Lumina-mGPT


@pytest.mark.parametrize("size,hw", [((32, 64), (2, 4)), ((96, 64), (6, 4)), (64, (4, 4)), ((64, 128), (4, 8))])
def test_lumina_plan(models, size, hw):
    m = models["chameleon"]
    vm = _vocab(m)
    plan = families.image_plan(m, size)
    assert (plan.height, plan.width) == hw and plan.family == "chameleon"
    assert plan.head == "lm" and plan.cfg_mode == "logits"
    H, W = plan.pixel_size
    assert plan.prefix == (
        vm["<racm3:break>"],
        vm[f"<reserved{8800 + H // 32:05d}>"],
        vm[f"<reserved{8800 + W // 32:05d}>"],
    )
    _check_grid(plan, vm["<reserved08799>"], [vm["<eoss>"], vm["<reserved08706>"]])
    assert plan.total_tokens == 3 + hw[0] * (hw[1] + 1) + 2
    _check_codes(plan, vm, chameleon.lumina_code)
    # the tiny vocabulary's 32 image tokens are named for codes 0..31
    assert sorted(plan.token_of_code.tolist()) == sorted(vm[f] for f in vm if f.startswith("IMGIMG"))
    assert plan.token_of_code.shape == (32,)


def test_lumina_768_count(models):
    m = models["chameleon"]
    vm = _vocab(m)
    plan = families.image_plan(m)
    assert (plan.height, plan.width, plan.pixel_size) == (48, 48, (768, 768))
    assert plan.total_tokens == 2357 and plan.num_generated == 2354
    assert plan.prefix[1:] == (vm["<reserved08824>"],) * 2  # the published H/W token for 768 px
    _check_grid(plan, vm["<reserved08799>"], [vm["<eoss>"], vm["<reserved08706>"]])


def test_lumina_code_names():
    assert chameleon.lumina_code("IMGIMGAZ") == 0
    assert chameleon.lumina_code("IMGIMGBAZ") == 10
    assert chameleon.lumina_code("IMGIMGHBJCZ") == 7192
    assert chameleon.lumina_code("<eoss>") is None
    with pytest.raises(ValueError, match=r"A\.\.J"):
        chameleon.lumina_code("IMGIMGKZ")


@pytest.mark.parametrize("size", [48, (64, 48), (100, 64), 0, (64,), "big"])
def test_lumina_bad_size(models, size):
    with pytest.raises(ValueError, match="size"):
        families.image_plan(models["chameleon"], size)


def test_lumina_size_error_names_the_rule(models):
    with pytest.raises(ValueError, match=r"not a multiple of 32 px.*32-px units"):
        families.image_plan(models["chameleon"], (64, 48))


def test_lumina_missing_grid_token(models):
    # 2048 px needs <reserved08864>, absent from the tiny vocabulary (grid tokens 1..32)
    with pytest.raises(ValueError, match="<reserved08864>"):
        families.image_plan(models["chameleon"], 2048)


def test_lumina_prompts(models):
    m = models["chameleon"]
    vm = _vocab(m)
    plan = families.image_plan(m, (32, 64))
    cond, uncond = families.prompt_ids(m, ["A red cat.", "Two dogs"], plan)
    assert uncond == [[], []]
    for ids, cap in zip(cond, ["A red cat.", "Two dogs"], strict=True):
        assert ids[0] == vm["<s>"] and ids[-1] == vm["<reserved08706>"]
        assert _text(m, ids[1:-1]) == f"Generate an image of 64x32 according to the following prompt:\n{cap}"
    assert _text(m, cond[0]).startswith("<s>Generate") and _text(m, cond[0]).endswith("cat.<reserved08706>")
    # a single string and token-id lists
    c1, u1 = families.prompt_ids(m, "A red cat.", plan)
    assert c1 == cond[:1] and u1 == [[]]
    c2, u2 = families.prompt_ids(m, [5, 6, 7], plan)
    assert c2 == [[5, 6, 7]] and u2 == [[]]
    c3, _ = families.prompt_ids(m, [[1, 2], np.array([3, 4]), "A red cat."], plan)
    assert c3 == [[1, 2], [3, 4], cond[0]]
    c4, _ = families.prompt_ids(m, np.array([[1, 2], [3, 4]]), plan)
    assert c4 == [[1, 2], [3, 4]]


# ----------------------------------------------------------------------------- Emu3


def _visual(name):
    import re

    mt = re.match(r"^<\|visual token (\d+)\|>$", name)
    return int(mt[1]) if mt else None


@pytest.mark.parametrize("size,hw", [((64, 48), (8, 6)), (16, (2, 2)), ((24, 40), (3, 5))])
def test_emu3_plan(models, size, hw):
    m = models["emu3"]
    vm = _vocab(m)
    plan = families.image_plan(m, size)
    assert (plan.height, plan.width) == hw and plan.family == "emu3"
    assert plan.prefix == () and plan.head == "lm" and plan.cfg_mode == "log_softmax"
    _check_grid(plan, vm["<|extra_200|>"], [vm["<|extra_201|>"], vm["<|image end|>"], vm["<|extra_204|>"]])
    assert plan.total_tokens == hw[0] * (hw[1] + 1) + 3
    _check_codes(plan, vm, _visual)
    assert plan.token_of_code.tolist() == [vm[f"<|visual token {i:06d}|>"] for i in range(32)]


def test_emu3_720_count(models):
    plan = families.image_plan(models["emu3"])
    assert (plan.height, plan.width, plan.pixel_size) == (90, 90, (720, 720))
    assert plan.total_tokens == plan.num_generated == 8193


@pytest.mark.parametrize("size", [(64, 50), 721, 4])
def test_emu3_bad_size(models, size):
    with pytest.raises(ValueError, match="not a multiple of 8 px"):
        families.image_plan(models["emu3"], size)


def test_emu3_prompts(models):
    m = models["emu3"]
    vm = _vocab(m)
    plan = families.image_plan(m, (64, 48))
    cond, uncond = families.prompt_ids(m, "A cat.", plan)
    prefix = [vm["<|image start|>"], vm["8"], vm["*"], vm["6"], vm["<|image token|>"]]
    c, u = cond[0], uncond[0]
    assert c[0] == vm["<|extra_203|>"] and c[-5:] == prefix
    assert _text(m, c[1:-5]) == "A cat. masterpiece, film grained, best quality."
    assert _text(m, c) == (
        "<|extra_203|>A cat. masterpiece, film grained, best quality.<|image start|>8*6<|image token|>"
    )
    assert u[0] == vm["<|extra_203|>"] and u[-5:] == prefix  # negative prompt ends like the cond prompt
    assert _text(m, u[1:-5]) == emu3.EMU3_NEGATIVE_PROMPT
    # custom negative prompt
    _, u2 = families.prompt_ids(m, "A cat.", plan, negative_prompt="ugly")
    assert _text(m, u2[0]) == "<|extra_203|>ugly<|image start|>8*6<|image token|>"
    # token lists: passed through; uncond copies the list's image prefix (from its last BOI)
    ids = [vm["<|extra_203|>"], 50, 51, vm["<|image start|>"], vm["2"], vm["*"], vm["2"], vm["<|image token|>"]]
    c3, u3 = families.prompt_ids(m, [ids], plan)
    assert c3 == [ids] and u3[0][-5:] == ids[-5:] and _text(m, u3[0][1:-5]) == emu3.EMU3_NEGATIVE_PROMPT
    # without a BOI the plan's prefix is used
    _, u4 = families.prompt_ids(m, [[vm["<|extra_203|>"], 50]], plan)
    assert u4[0][-5:] == prefix


def test_emu3_prompts_without_tokenizer(models):
    m = models["emu3_notok"]
    vm = _vocab(m)
    plan = families.image_plan(m, (64, 48))
    ids = [vm["<|extra_203|>"], 50, vm["<|image start|>"], 60, 61, vm["<|image token|>"]]
    c, u = families.prompt_ids(m, [ids], plan)
    assert c == [ids] and u == [[vm["<|extra_203|>"], vm["<|image start|>"], 60, 61, vm["<|image token|>"]]]
    with pytest.raises(ValueError, match="no <\\|image start\\|>"):
        families.prompt_ids(m, [[vm["<|extra_203|>"], 50]], plan)


# ----------------------------------------------------------------------------- Janus-Pro


def test_janus_plan(models):
    m = models["janus"]
    plan = families.image_plan(m)
    assert (plan.height, plan.width, plan.pixel_size) == (4, 4, (64, 64))  # vq_config.num_patches = 4
    assert plan.prefix == () and plan.head == "gen" and plan.cfg_mode == "logits"
    assert plan.forced.tolist() == [-1] * 16 and plan.total_tokens == 16
    assert plan.allowed.shape == (N_CODES,) and plan.allowed.all()
    assert plan.code_of_token.tolist() == list(range(N_CODES))
    assert families.image_plan(m, 64).height == 4
    codes = np.arange(16).reshape(1, 4, 4) % N_CODES
    np.testing.assert_array_equal(plan.tokens_to_codes(plan.codes_to_tokens(codes)), codes)


def test_janus_default_grid():
    m = Model(_config("janus"), None, path=None, hf_config={})
    plan = families.image_plan(m)
    assert (plan.height, plan.width) == (24, 24) and plan.total_tokens == 576
    assert families.image_plan(m, 128).height == 8  # no grid in the config: any square multiple of 16
    orig = Model(_config("janus"), None, hf_config={"vision_config": {"params": {"image_size": 384}}})
    assert families.image_plan(orig).height == 24
    hf = Model(_config("janus"), None, hf_config={"vision_config": {"num_image_tokens": 576}})
    assert families.image_plan(hf).height == 24


@pytest.mark.parametrize("size,msg", [(384, "fixed 4x4 code grid"), ((64, 32), "square"), (72, "multiple of 16")])
def test_janus_bad_size(models, size, msg):
    with pytest.raises(ValueError, match=msg):
        families.image_plan(models["janus"], size)


def test_janus_prompts(models):
    m = models["janus"]
    vm = _vocab(m)
    plan = families.image_plan(m)
    cond, uncond = families.prompt_ids(m, ["A cat.", "Dog"], plan)
    for c, u, cap in zip(cond, uncond, ["A cat.", "Dog"], strict=True):
        assert c[0] == vm["<｜begin▁of▁sentence｜>"] and c[-1] == vm["<begin_of_image>"]
        assert _text(m, c[1:-1]) == f"<|User|>: {cap}\n\n<|Assistant|>:"
        assert len(u) == len(c) and u[0] == c[0] and u[-1] == c[-1]
        assert u[1:-1] == [vm["<｜▁pad▁｜>"]] * (len(c) - 2)
    c2, u2 = families.prompt_ids(m, [[0, 9, 9, 9, 3]], plan)
    assert c2 == [[0, 9, 9, 9, 3]] and u2 == [[0, 2, 2, 2, 3]]


def test_janus_pad_without_tokenizer(models):
    bare = models["janus_notok"]
    plan = families.image_plan(bare)
    with pytest.raises(ValueError, match="pad"):
        families.prompt_ids(bare, [[0, 9, 9, 3]], plan)
    withpad = Model(_config("janus"), None, path=bare.path, hf_config={"text_config": {"pad_token_id": 7}})
    assert families.prompt_ids(withpad, [[0, 9, 9, 3]], plan)[1] == [[0, 7, 7, 3]]
    with pytest.raises(ValueError, match="at least BOS"):
        families.prompt_ids(models["janus"], [[0]], plan)


# ----------------------------------------------------------------------------- shared errors and defaults


@pytest.mark.parametrize("family", ["chameleon", "emu3", "janus"])
def test_string_prompt_needs_tokenizer(models, family):
    m = models[family + "_notok"]
    plan = families.image_plan(m, 64)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        families.prompt_ids(m, "A cat.", plan)
    nopath = Model(m.config, None, path=None, hf_config=m.hf_config)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        families.prompt_ids(nopath, ["A cat."], plan)


def test_unknown_family():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(family="llama", vocab_size=10), vocabulary={})
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        families.image_plan(fake)
    with pytest.raises(ValueError, match="unknown model family"):
        families.prompt_ids(fake, [[1]], None)
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        families.sampling_defaults("llama")


def test_bad_prompts(models):
    m = models["chameleon"]
    plan = families.image_plan(m, 64)
    with pytest.raises(ValueError, match="out of range"):
        families.prompt_ids(m, [[1, V_LM]], plan)
    with pytest.raises(ValueError, match="empty"):
        families.prompt_ids(m, [[]], plan)
    with pytest.raises(ValueError, match="non-empty"):
        families.prompt_ids(m, [], plan)
    with pytest.raises(ValueError, match="string or a list of token ids"):
        families.prompt_ids(m, [1.5, "x"], plan)
    with pytest.raises(ValueError, match="plan is for emu3"):
        families.prompt_ids(m, "x", families.image_plan(models["emu3"], 64))
    with pytest.raises(ValueError, match="Emu3 only"):
        families.prompt_ids(m, "x", plan, negative_prompt="ugly")


def test_missing_special_token(models, tmp_path):
    vm = {k: v for k, v in lumina_vocabulary(V_LM).items() if k != "<reserved08799>"}
    m = Model(_config("chameleon"), None, path=tmp_path, hf_config={"vocabulary_map": vm})
    with pytest.raises(ValueError, match="<reserved08799>"):
        families.image_plan(m, 64)
    noimg = {k: v for k, v in lumina_vocabulary(V_LM).items() if not k.startswith("IMGIMG")}
    m2 = Model(_config("chameleon"), None, path=tmp_path, hf_config={"vocabulary_map": noimg})
    with pytest.raises(ValueError, match="no image tokens"):
        families.image_plan(m2, 64)


def test_tokens_to_codes_shapes(models):
    plan = families.image_plan(models["chameleon"], 64)
    with pytest.raises(ValueError, match="last dim"):
        plan.tokens_to_codes(np.zeros((1, 7), np.int32))
    bad = plan.codes_to_tokens(np.zeros((4, 4), np.int32)).copy()
    bad[0] = 0  # a non-image token at a free position
    assert plan.tokens_to_codes(bad)[0, 0] == -1
    with pytest.raises(ValueError, match="out of range"):
        plan.codes_to_tokens(np.full((4, 4), 99))


def test_sampling_defaults(models):
    assert families.sampling_defaults("chameleon") == dict(temperature=1.0, top_k=2000, top_p=1.0, cfg_scale=3.0)
    assert families.sampling_defaults("emu3") == dict(temperature=1.0, top_k=2048, top_p=1.0, cfg_scale=3.0)
    assert families.sampling_defaults(models["janus"]) == dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=5.0)
    d = families.sampling_defaults("emu3")
    d["top_k"] = 1
    assert families.sampling_defaults("emu3")["top_k"] == 2048  # a copy


def test_tokenizer_vocabulary_agrees(models):
    from tokenizers import Tokenizer

    for fam, make in VOCABS.items():
        tok = Tokenizer.from_file(str(Path(models[fam].path) / "tokenizer.json"))
        assert tok.get_vocab(with_added_tokens=True) == make()


# ----------------------------------------------------------------------------- real tiny checkpoints


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    pytest.importorskip("torch")
    import sjd2_jax
    from sjd2_jax.io.importer import import_checkpoint

    from synthetic import (
        add_layout_tokenizer,
        make_chameleon_checkpoint,
        make_emu3_checkpoint,
        make_janus_checkpoint,
    )

    src, dst = tmp_path_factory.mktemp("layout_src"), tmp_path_factory.mktemp("layout_ours")
    makers = {
        "chameleon": lambda p: make_chameleon_checkpoint(p, layout="lumina", num_layers=1, vocab_size=V_LM),
        "emu3": lambda p: make_emu3_checkpoint(p, num_layers=1, vocab_size=V_LM),
        "emu3_original": lambda p: make_emu3_checkpoint(p, layout="original", num_layers=1, vocab_size=V_LM),
        "janus": lambda p: make_janus_checkpoint(p, num_layers=1, vocab_size=V_JANUS),
        "janus_original": lambda p: make_janus_checkpoint(p, layout="original", num_layers=1, vocab_size=V_JANUS),
    }
    out = {}
    for name, make in makers.items():
        make(src / name)
        vm = add_layout_tokenizer(src / name, name.split("_")[0])
        info = import_checkpoint(src / name, dst / name, progress=False)
        assert "tokenizer.json" in info["tokenizer_files"]
        out[name] = (sjd2_jax.load(info["out"]), vm)
    return out


@pytest.mark.torch
@pytest.mark.parametrize("name", ["chameleon", "emu3", "emu3_original", "janus", "janus_original"])
def test_imported_checkpoints(imported, models, name):
    model, vm = imported[name]
    fam = name.split("_")[0]
    assert families.vocabulary(model) == vm
    if fam in ("chameleon", "emu3") and name != "emu3_original":
        assert model.vocabulary == vm  # config.json vocabulary_map agrees with the tokenizer
    size = {"chameleon": (32, 64), "emu3": (64, 48), "janus": None}[fam]
    fake = models[fam]
    if fam == "janus":  # same grid rule as the checkpoint's config
        fake = Model(fake.config, None, path=fake.path, hf_config=model.hf_config)
    plan, ref = families.image_plan(model, size), families.image_plan(fake, size)
    for f in ("prefix", "height", "width", "head", "cfg_mode"):
        assert getattr(plan, f) == getattr(ref, f), f
    for f in ("forced", "allowed", "code_of_token", "token_of_code"):
        np.testing.assert_array_equal(getattr(plan, f), getattr(ref, f), err_msg=f)
    assert families.prompt_ids(model, ["A cat.", [1, 2, 3]], plan) == families.prompt_ids(
        fake, ["A cat.", [1, 2, 3]], ref
    )


@pytest.mark.torch
def test_imported_janus_grid(imported):
    # HF JanusConfig: vq_config.num_patches = vision image_size // patch_size = 32 // 8
    assert families.image_plan(imported["janus"][0]).height == 4
    # original MultiModalityConfig: vision_config.params.image_size // 16 = 32 // 16
    assert families.image_plan(imported["janus_original"][0]).height == 2
    hf = json.loads((Path(imported["janus"][0].path) / "hf_config.json").read_text())
    assert hf["vq_config"]["num_patches"] == 4
