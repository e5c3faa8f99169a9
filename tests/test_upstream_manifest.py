"""The packaged upstream manifest: what it pins, and how a bad manifest is reported."""
from __future__ import annotations

from pathlib import Path

import pytest

from deqfusion.upstream.errors import UpstreamError
from deqfusion.upstream.manifest import PACKAGED_MANIFEST, load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[1]

# name -> (repo, pinned commit, license), as checked in snapshots of the real repositories
PINS = {
    "mmdynamics": ("TencentAILabHealthcare/mmdynamics", "7f04084daa81ef6223902677ad9ddafc8797b3d2", "none"),
    "multibench": ("pliang279/MultiBench", "49f9be224f342de005b7f001281f33df4301eb22", "MIT"),
    "cmbert": ("thuiar/Cross-Modal-BERT", "3e44dce6b00431f88f8d5de12bef9706116fa97b", "none"),
    "imvotenet": ("facebookresearch/imvotenet", "a8856345146bacf29a57266a2f0b874406fd8823", "MIT"),
    "mcan": ("MILVLG/mcan-vqa", "6b165e9a88800e2a09ece4645a3c8261938897c6", "Apache-2.0"),
    "mutan": ("Cadene/block.bootstrap.pytorch", "e938e9e269d2ec67499db327b903edbe821fed5f", "BSD-3-Clause"),
}


def test_packaged_manifest_pins():
    m = load_manifest(str(PACKAGED_MANIFEST))
    assert m.branch == "deqfusion"
    for name, (repo, commit, license_) in PINS.items():
        e = m.get(name)
        assert (e.repo, e.commit, e.license) == (repo, commit, license_)
        assert e.source == "git" and e.url == f"https://github.com/{repo}.git"
        assert e.patches == f"patches/{name}" and e.adapter == f"deqfusion.adapters.{name}"
        assert e.docker == f"docker/{name}/Dockerfile" and e.train
    assert m.get("mutan").integration == "plugin"
    pip = m.get("mmdet3d")
    assert pip.source == "pip" and pip.package == "mmdet3d==1.4.0" and not pip.clonable
    for e in m:
        if e.license == "none":
            assert "no license" in e.license_note.lower() or "all rights reserved" in e.license_note.lower()


def test_manifest_ships_with_the_package():
    setup = (REPO / "setup.py").read_text()
    assert '"deqfusion.upstream": ["*.toml"]' in setup
    assert PACKAGED_MANIFEST.parent == REPO / "core" / "upstream"
    assert "core/upstream/upstreams.toml" in (REPO / "third_party" / "README.md").read_text()


def _entry(**over):
    base = {"status": "planned", "source": "git", "integration": "patch", "train": "t", "license": "MIT",
            "url": "u", "commit": "a" * 40}
    base.update(over)
    return {"upstreams": {"x": {k: v for k, v in base.items() if v is not None}}}


@pytest.mark.parametrize("data, message", [
    (_entry(commit="abc123"), "40-hex"),
    (_entry(status="done"), "status"),
    (_entry(licence="MIT"), "unknown keys"),
    (_entry(url=None), "lacks ['url']"),
    (_entry(source="pip"), "lacks ['package']"),
    ({"upstreams": {}}, "no [upstreams"),
    ({"schema": 2, **_entry()}, "schema"),
])
def test_bad_manifest_is_a_usage_error(data, message):
    with pytest.raises(UpstreamError) as info:
        parse_manifest(data, Path("m.toml"))
    assert message in str(info.value) and info.value.code == 2


def test_invalid_toml(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text("[upstreams.x\n")
    with pytest.raises(UpstreamError, match="not valid TOML"):
        load_manifest(str(bad))
