"""The node's config (node.yaml) and its journal, without a network."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctsparse.dicom_node.config import load_node_config
from ctsparse.dicom_node.journal import MAX_ATTEMPTS, Journal
from ctsparse.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = "checkpoint: best.pt\nstorage: node\nallowed_callers: [PACS]\n"


def test_shipped_node_yaml_loads() -> None:
    cfg = load_node_config(CONFIGS / "node.yaml")
    assert (cfg.ae_title, cfg.port, cfg.allowed_callers) == ("CTSPARSE", 11112, ["ORTHANC"])
    assert [(d.ae_title, d.port) for d in cfg.destinations] == [("ORTHANC", 4242)]
    assert cfg.predict.threads == 1 and cfg.quiet_seconds == 10


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("bogus: 1\n", "bogus", "unknown key"),
        ("predict: {device: cpu, gpus: 2}\n", "predict.gpus", "unknown key"),
        (
            "destinations: [{ae_title: PACS, host: h, port: 104, tls: true}]\n",
            "destinations[0].tls",
            "unknown",
        ),
        ("port: eleven\n", "port", "expected an integer"),
        ("ae_title: A_TITLE_LONGER_THAN_16\n", "ae_title", "not an AE title"),
        ("allowed_callers: []\n", "allowed_callers", "at least one"),
        ("destinations: [{ae_title: PACS, port: 104}]\n", "destinations[0].host", "required"),
        ("stow_url: ftp://pacs/dicom-web\n", "stow_url", "http"),
        ("quiet_seconds: -1\n", "quiet_seconds", ">= 0"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, extra: str, key: str, words: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(MINIMAL + extra)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert info.value.key == key and words in info.value.reason


def test_checkpoint_and_storage_are_required(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("allowed_callers: [PACS]\n")
    with pytest.raises(ConfigError, match="'checkpoint'"):
        load_node_config(path)


def test_journal_survives_reopening_and_requeues_an_interrupted_prediction_once(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite"
    journal = Journal(db)
    for _ in range(3):
        journal.received("1.2.3", "1.2", now=100.0)
    journal.received("1.2.4", "1.2", now=150.0)
    assert [s.series_uid for s in journal.due(quiet_seconds=10, now=120.0)] == ["1.2.3"]
    assert journal.start("1.2.3") == 1
    journal.close()  # as if killed inside the prediction

    journal = Journal(db)
    assert journal.recover() == (["1.2.3"], [])
    assert journal.get("1.2.3").status == "received"  # type: ignore[union-attr]
    assert journal.start("1.2.3") == MAX_ATTEMPTS
    journal.close()  # killed again

    journal = Journal(db)
    assert journal.recover() == ([], ["1.2.3"])
    state = journal.get("1.2.3")
    assert state is not None and state.status == "failed" and "2 predictions" in (state.error or "")
    assert (state.instances, state.late) == (3, 0)
    journal.received("1.2.3", "1.2")  # a late instance of a finished series is counted, not requeued
    assert journal.get("1.2.3").late == 1  # type: ignore[union-attr]
    assert [s.series_uid for s in journal.due(0.0)] == ["1.2.4"]


def test_sent_destinations_are_remembered(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.received("1.5", "1.4")
    journal.start("1.5")
    journal.predicted("1.5", "nodule", tmp_path / "1.5.sr.dcm")
    journal.sent("1.5", ["PACS@h:104"])
    journal.retry_later("1.5", at=1e12, error="down")
    assert journal.to_send() == []  # waiting for its retry time
    (state,) = journal.to_send(now=2e12)
    assert state.sent == ("PACS@h:104",) and state.error == "down"
    journal.done("1.5")
    assert journal.get("1.5").status == "done" and journal.to_send(now=3e12) == []  # type: ignore[union-attr]


def test_serve_with_an_unusable_checkpoint_stops_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctsparse.cli.main import app

    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    config = tmp_path / "node.yaml"
    config.write_text(f"checkpoint: {tmp_path / 'best.pt'}\nstorage: {tmp_path / 'node'}\nport: 0\n")
    res = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert res.exit_code == 1 and "'allowed_callers'" in res.output
    config.write_text(config.read_text() + "allowed_callers: [PACS]\n")
    res = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert res.exit_code == 1, res.output
    assert "listening on 127.0.0.1" in res.output and "stopped" in res.output
    assert (
        res.output.strip()
        .splitlines()[-1]
        .startswith(f"error: {tmp_path / 'best.pt'}: not a readable checkpoint")
    )
