"""Tensor parallelism at launch: one AsyncTLS config for every rank, heads that cannot be split refused
before any scheduler starts, and nothing but the backend's head slice reading the rank."""

import json
import os
import pickle
import re
import subprocess
import sys

import pytest
from test_plugin import models, parse  # noqa: F401 (fixtures: config-only model dirs, launch-time parsing)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--enable-asynctls", "--asynctls-token-budget", "512", "--asynctls-label-channels", "16",
         "--asynctls-dense-below", "2048"]
# what the launcher decides for every rank (ServerArgs fields our plugin sets or that shape admission)
DECIDED_ONCE = ("attention_backend", "page_size", "tp_size", "dp_size", "context_length", "chunked_prefill_size",
                "max_running_requests", "mem_fraction_static", "cuda_graph_backend_prefill")


@pytest.fixture
def model_dir(tmp_path):
    def make(num_heads, num_kv_heads):
        cfg = json.load(open(os.path.join(ROOT, "tests", "models", "tiny_llama.json")))
        cfg.update(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, hidden_size=32 * num_heads)
        d = tmp_path / f"llama_{num_heads}_{num_kv_heads}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    return make


def test_every_rank_gets_the_launchers_config(parse, models):  # noqa: F811
    from sglang_asynctls.runtime_config import ENV_VAR, config_of

    sa = parse(models["tiny_llama"], *FLAGS, "--tp-size", "2")
    cfg = sa._asynctls_config
    ranks = [pickle.loads(pickle.dumps(sa)) for _ in range(sa.tp_size)]  # as SGLang's spawn hands it to each
    assert all(config_of(r) == cfg for r in ranks)
    for field in DECIDED_ONCE:
        assert len({repr(getattr(r, field, None)) for r in ranks + [sa]}) == 1, field
    # the environment route (ServerArgs built without the CLI): a fresh interpreter, as a scheduler process is
    code = "from sglang_asynctls.runtime_config import config_of; print(config_of(object()).to_json())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert os.environ[ENV_VAR] == cfg.to_json() == out.stdout.strip()


@pytest.mark.parametrize("heads, kv, tp", [(8, 2, 2), (8, 2, 4), (12, 4, 2), (9, 3, 3)])
def test_heads_that_split_are_accepted(parse, model_dir, heads, kv, tp):  # noqa: F811
    sa = parse(model_dir(heads, kv), *FLAGS, "--tp-size", str(tp))
    assert sa.tp_size == tp and sa.attention_backend == "asynctls"


@pytest.mark.parametrize("heads, kv, tp", [(9, 3, 2), (8, 2, 3), (12, 6, 4)])
def test_heads_that_do_not_split_are_refused_at_launch(parse, model_dir, capsys, heads, kv, tp):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        parse(model_dir(heads, kv), *FLAGS, "--tp-size", str(tp))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sglang-asynctls: error: --enable-asynctls with attention tensor parallel size "
                          f"{tp}") and f"(got {heads} query heads, {kv} KV heads)" in err


def test_attention_tp_size_is_sglangs_split(parse, models):  # noqa: F811
    from sglang_asynctls.patches.server_args_from_cli import _attn_tp_size

    assert _attn_tp_size(parse(models["tiny_llama"], *FLAGS, "--tp-size", "2")) == 2
    dp_attention = parse(models["tiny_llama"], *FLAGS, "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
    assert _attn_tp_size(dp_attention) == 1


def test_only_the_backend_head_slice_reads_the_rank():
    """No module of ours reads parallel state or talks across ranks except the backend's `_attn_tp` (which feeds
    `kv_heads_of_rank`) and the launcher's TP-size check: admission and scheduling cannot differ by rank."""
    pattern = re.compile(r"get_parallel|torch\.distributed|\bdist\.|all_reduce|all_gather|get_rank\(|tp_rank|"
                         r"tensor_model_parallel|compute_dp_attention_world_info|LOCAL_RANK")
    hits = {}
    for top in ("sglang_asynctls", "patches", "kernels"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    for line in open(path):
                        if pattern.search(line.split("#")[0]):
                            hits.setdefault(os.path.relpath(path, ROOT), []).append(line.strip())
    assert set(hits) == {"sglang_asynctls/backend.py", "sglang_asynctls/model_spec.py",
                         "patches/server_args_from_cli.py"}, hits
    assert all("get_parallel" in ln or "kv_heads_of_rank" in ln or "def _attn_tp" in ln
               for ln in hits["sglang_asynctls/backend.py"]), hits["sglang_asynctls/backend.py"]
    assert all("attn_tp_rank" in ln for ln in hits["sglang_asynctls/model_spec.py"])
