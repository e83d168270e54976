"""Version policies, config.json, and the registry's lookups, leases and thread shares.

The registry is tested with stand-in versions (a name, a version, a hold count): what is under
test is which version a lookup returns and when, not a model. tests/test_reload.py proves the
same against a real gunicorn with real Keras models.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from model_folder.errors import ModelFolderError
from model_folder.repository import ModelConfig, ModelEntry, VersionFolder, VersionPolicy
from service.errors import ModelNotFound, ModelNotReady, Overloaded
from service.registry import Models, State
from service.runner.inference import ModelVersion

# Policies


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("latest", [9]),
        ("latest:2", [3, 9]),
        ("latest:10", [1, 2, 3, 9]),
        ("all", [1, 2, 3, 9]),
        ("specific:1,3,4", [1, 3]),
        (" latest ", [9]),
    ],
)
def test_each_policy_selects_its_versions(policy, served):
    assert VersionPolicy.parse(policy).select([3, 1, 9, 2]) == served


@pytest.mark.parametrize(
    "text", ["", "newest", "latest:0", "latest:x", "all:2", "specific:", "specific:a"]
)
def test_a_malformed_policy_is_refused_naming_the_forms(text):
    with pytest.raises(ModelFolderError, match="is not one of latest, latest:N, all"):
        VersionPolicy.parse(text)


@pytest.mark.parametrize("text", ["latest", "latest:3", "all", "specific:1,3"])
def test_a_policy_reads_back_as_written(text):
    assert str(VersionPolicy.parse(text)) == text


def entry(versions: list[int], policy: str | None = None) -> ModelEntry:
    folders = {str(v): VersionFolder(str(v), Path(str(v)), ()) for v in versions}
    config = ModelConfig(VersionPolicy.parse(policy) if policy else None)
    return ModelEntry("m", Path("m"), folders, config)


def test_a_refused_newest_version_leaves_the_one_before_served():
    assert entry([1, 2, 3]).served_versions(VersionPolicy(), refused=["3"]) == ["2"]
    assert entry([1, 2, 3]).served_versions(VersionPolicy.parse("latest:2"), refused=["3"]) == [
        "1",
        "2",
    ]


def test_a_models_own_policy_wins_over_the_services():
    assert entry([1, 2, 3], "all").served_versions(VersionPolicy()) == ["1", "2", "3"]


def test_config_json_gives_policy_and_labels(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"version_policy": "latest:2", "labels": {"stable": 1, "canary": "2"}})
    )
    config = ModelConfig.read(path)
    assert str(config.version_policy) == "latest:2"
    assert config.labels == {"stable": "1", "canary": "2"}
    assert ModelConfig.read(tmp_path / "absent.json") == ModelConfig()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{", "not valid JSON"),
        ('{"policy": "all"}', "must be {"),
        ('{"version_policy": 2}', "version_policy must be a string"),
        ('{"version_policy": "best"}', "is not one of"),
        ('{"labels": {"stable": "one"}}', "labels must map names to versions"),
    ],
)
def test_a_bad_config_json_is_refused_naming_the_file(tmp_path, document, message):
    path = tmp_path / "config.json"
    path.write_text(document)
    with pytest.raises(ModelFolderError, match=message) as caught:
        ModelConfig.read(path)
    assert str(path) in str(caught.value)


# The registry


def version(name: str, number: str) -> ModelVersion:
    """Return a stand-in served version: the registry only reads its info and holds it."""
    held = SimpleNamespace(count=0, idle=threading.Event())
    held.idle.set()

    def hold() -> None:
        held.count += 1
        held.idle.clear()

    def release() -> None:
        held.count -= 1
        if held.count == 0:
            held.idle.set()

    stand_in = SimpleNamespace(
        info=SimpleNamespace(name=name, version=number),
        hold=hold,
        release=release,
        held=held,
        alive=True,
    )
    return stand_in  # type: ignore[return-value]


def registry(*versions: ModelVersion, threads: int = 16) -> Models:
    models = Models(threads)
    for served in versions:
        models.publish(served)
    models.unready_reason = None
    return models


def test_unpinned_lookups_get_the_newest_available_version_by_number():
    v9, v10 = version("m", "9"), version("m", "10")
    models = registry(v10, v9)
    assert models.acquire() is v10
    assert models.acquire("m", "9") is v9
    models.set_state("m", "11", State.LOADING)
    assert models.find("m") is v10, "a version still loading is not served"


def test_a_retired_version_is_not_found_but_finishes_what_it_holds():
    v1, v2 = version("m", "1"), version("m", "2")
    models = registry(v1)
    held = models.acquire("m")
    models.publish(v2)
    assert models.retire("m", "1") is v1
    assert models.find("m") is v2
    with pytest.raises(ModelNotFound, match="it is UNLOADING"):
        models.find("m", "1")
    assert not v1.held.idle.is_set(), "the request given version 1 still holds it"
    models.release(held)
    assert v1.held.idle.is_set()


def test_labels_name_versions():
    v1, v2 = version("m", "1"), version("m", "2")
    models = registry(v1, v2)
    models.set_labels("m", {"stable": "1"})
    assert models.find("m", label="stable") is v1
    with pytest.raises(ModelNotFound, match="no version label 'canary'"):
        models.find("m", label="canary")


def test_a_name_is_needed_only_when_several_models_are_served():
    models = registry(version("a", "1"), version("b", "1"))
    with pytest.raises(ModelNotFound, match="several models are served"):
        models.find()
    assert models.find("b").info.name == "b"


def test_while_loading_a_lookup_is_not_ready_rather_than_not_found():
    models = Models(16)
    with pytest.raises(ModelNotReady, match="still loading"):
        models.find("m")
    models.unready_reason = None
    with pytest.raises(ModelNotFound):
        models.find("m")


def test_a_busy_model_gets_no_more_than_its_share_of_threads():
    busy, quiet = version("busy", "1"), version("quiet", "1")
    models = registry(busy, quiet, threads=8)
    held = [models.acquire("busy") for _ in range(6)]  # 8 less a reserve of 2 for "quiet"
    with pytest.raises(Overloaded, match="share of request threads"):
        models.acquire("busy")
    assert [models.acquire("quiet") for _ in range(2)]
    models.release(held[0])
    assert models.acquire("busy") is busy


def test_one_model_may_use_every_thread():
    only = version("m", "1")
    models = registry(only, threads=4)
    assert [models.acquire("m") for _ in range(4)]


def test_a_version_published_again_while_the_old_copy_unloads_stays_available():
    old, again = version("m", "2"), version("m", "2")
    models = registry(old)
    assert models.retire("m", "2") is old
    models.publish(again)  # its folder came back and loaded before the old copy was freed
    models.end(old)
    assert models.find("m", "2") is again
    models.end(again)
    assert [s.state for s in models.statuses("m")] == [State.END]
