"""Profiles: loading, input schema, defaults, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sandboxer.profiles import ProfileCatalog, ProfileError, load_profile


def test_shipped_saas_stub_profile() -> None:
    profile = ProfileCatalog.discover().get("profile.saas-stub")
    assert profile.extension == "saas-stub"
    assert profile.resolve_inputs({}) == {"size": "small"}
    assert profile.resolve_inputs({"api_key": "k", "size": "large"}) == {
        "size": "large",
        "api_key": "k",
    }
    assert profile.secret_inputs() == ["api_key"]
    assert profile.resolve_ttl(None) == 600


def test_required_inputs_and_unknown_profile(tmp_path: Path) -> None:
    (tmp_path / "profile.needs-repo.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "profile.needs-repo",
                "extension": "saas-stub",
                "inputs": {"repo": {"required": True}},
            }
        )
    )
    catalog = ProfileCatalog.discover([tmp_path])
    with pytest.raises(ProfileError, match="requires input 'repo'") as err:
        catalog.get("profile.needs-repo").resolve_inputs({})
    assert err.value.field == "inputs.repo"
    with pytest.raises(ProfileError, match="unknown profile") as err:
        catalog.get("profile.none")
    assert err.value.field == "profile"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"name": "profile.other", "extension": "x"}, "name must be 'profile.bad'"),
        ({"name": "profile.bad"}, "give either 'extension' or 'route'"),
        (
            {"name": "profile.bad", "extension": "x", "route": [{"extension": "y"}]},
            "give either 'extension' or 'route'",
        ),
        (
            {"name": "profile.bad", "route": [{"extension": "y", "when": "sometimes"}]},
            r"route\[0\].when must be one of always, credits_cover_estimate",
        ),
        ({"name": "profile.bad", "extension": "x", "inputs": {"Bad-Key": {}}}, "input name"),
        ({"name": "profile.bad", "extension": "x", "extra": 1}, "unknown field `extra`"),
    ],
)
def test_bad_profile_files(tmp_path: Path, content: dict[str, object], message: str) -> None:
    path = tmp_path / "profile.bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)
