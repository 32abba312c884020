"""One error vocabulary and one exception root.

Every value that goes in `x-error-type` is an `ErrorType` member (no string
literal can drift from the enum the AsyncAPI test checks), and every
exception the package defines derives from `WaddleError`, so `except
WaddleError` catches exactly ours.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import tomllib
from pathlib import Path

import pytest

from providers import errors as provider_errors
from schemas.errors import WaddleError
from schemas.events import EventError, parse_event
from schemas.headers import ErrorType

ROOT = Path(__file__).resolve().parent.parent


def _product_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names: list[str] = []
    for package in config["tool"]["importlinter"]["root_packages"]:  # = the wheel's packages
        names.append(package)
        module = importlib.import_module(package)
        names.extend(info.name for info in pkgutil.walk_packages(
            module.__path__, prefix=f"{package}.") if not info.name.endswith("__main__"))
    return names


def test_every_exception_of_the_package_derives_from_waddle_error() -> None:
    own: list[type[BaseException]] = []
    for name in _product_modules():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional extra (xllamacpp) not installed
            pytest.skip(f"{name}: {exc}")
        own.extend(
            cls for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == name)
    assert len(own) > 10, own
    strays = sorted(f"{cls.__module__}.{cls.__qualname__}"
                    for cls in own if not issubclass(cls, WaddleError))
    assert not strays, f"exceptions outside the WaddleError root: {strays}"


def test_the_old_bases_are_kept_so_no_except_changes_meaning() -> None:
    from config.settings import SettingsError
    from publishers.confirm import PublishFailed
    assert issubclass(EventError, ValueError)
    assert issubclass(SettingsError, ValueError)
    assert issubclass(PublishFailed, WaddleError)


def test_every_provider_error_type_is_an_error_type() -> None:
    classes = [cls for _, cls in inspect.getmembers(provider_errors, inspect.isclass)
               if issubclass(cls, provider_errors.ProviderError)]
    assert len(classes) >= 7
    for cls in classes:
        assert isinstance(cls.error_type, ErrorType), cls
    assert provider_errors.ProviderAuthFailed.error_type is ErrorType.UPSTREAM_AUTH_FAILED


def test_an_invalid_body_names_its_error_type_from_the_enum() -> None:
    with pytest.raises(EventError) as caught:
        parse_event(b"{not json")
    assert caught.value.error_type is ErrorType.INVALID_JSON
    with pytest.raises(EventError) as caught:
        parse_event(b"[]")
    assert caught.value.error_type is ErrorType.INVALID_SCHEMA
