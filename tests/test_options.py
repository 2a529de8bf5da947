"""The option registry (nsclean.algorithm.options) is the one source of every cleaner and
mask option: the library's defaults, the command line, the FITS keywords, the config
schema and the docs' tables all agree with it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from nsclean import cli
from nsclean.algorithm import core
from nsclean.algorithm.masks import MaskOptions
from nsclean.algorithm.options import (
    CLEAN_OPTIONS,
    MASK_OPTIONS,
    defaults,
    json_schema,
    markdown_table,
)
from nsclean.io import exposure

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SECTIONS = {"clean": CLEAN_OPTIONS, "mask": MASK_OPTIONS}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_config_schema_is_the_registry(section):
    """Every property of the schema's clean and mask sections (type, bounds, choices,
    default, description) is what the registry declares, and no option is missing."""
    schema = yaml.safe_load(SCHEMA.read_text())["properties"][section]["properties"]
    expected = {option.name: json_schema(option) for option in SECTIONS[section]}
    assert list(schema) == list(expected)
    for name, prop in expected.items():
        actual = dict(schema[name])
        # YAML folds long descriptions: compare the words
        actual["description"] = " ".join(actual["description"].split())
        assert actual == prop, name


def test_library_defaults_are_the_registry():
    assert core._DEFAULTS == defaults(CLEAN_OPTIONS)
    assert MaskOptions().to_dict() == defaults(MASK_OPTIONS)
    assert [f.name for f in dataclasses.fields(MaskOptions)] == [o.name for o in MASK_OPTIONS]


def test_fits_keywords_come_from_the_registry():
    """Each option recorded in products has one keyword, and no two share one."""
    fit = {o.name: (o.keyword, o.comment) for o in CLEAN_OPTIONS if o.keyword}
    mask = {o.name: (o.keyword, o.comment) for o in MASK_OPTIONS if o.keyword}
    assert exposure._FIT_KEYWORDS == fit and set(fit) == {o.name for o in CLEAN_OPTIONS}
    assert exposure._MASK_KEYWORDS == mask
    keywords = [k for k, _ in [*fit.values(), *mask.values()]]
    assert len(keywords) == len(set(keywords))
    assert all(len(k) <= 8 for k in keywords)


def _flags(parser: argparse.ArgumentParser, command: str) -> dict:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in sub.choices[command]._actions
            for flag in action.option_strings}


@pytest.mark.parametrize(("command", "tables"), [("clean", (CLEAN_OPTIONS, MASK_OPTIONS)),
                                                 ("mask", (MASK_OPTIONS,))])
def test_every_option_with_a_flag_is_on_the_command_line(command, tables):
    flags = _flags(cli.build_parser(), command)
    for options in tables:
        for option in options:
            if option.cli_flag is None:
                continue
            action = flags[option.cli_flag]
            assert option.help.split(";")[0].rstrip(".") in " ".join(action.help.split()), \
                option.name
            if option.choices:
                assert set(option.choices) <= set(action.choices), option.name


@pytest.mark.parametrize(("document", "section"), [("README.md", "clean"),
                                                   ("docs/workflow.md", "clean"),
                                                   ("docs/workflow.md", "mask")])
def test_docs_tables_are_generated_from_the_registry(document, section):
    """The tables between the generated-table markers are the registry's, verbatim
    (``python -m nsclean.algorithm.options markdown <section>`` prints them)."""
    text = (ROOT / document).read_text()
    match = re.search(rf"<!-- options: {section} -->\n(.*?)<!-- end options -->", text,
                      re.DOTALL)
    assert match, f"{document} has no generated {section} table"
    assert match.group(1) == markdown_table(SECTIONS[section])


def _stated_default(doc: str, name: str) -> str | None:
    """The "(default X)" a numpy-style docstring gives for parameter ``name``."""
    match = re.search(rf"^    {name} :.*?\n(.*?)(?=^    \w+ :|^    Returns|\Z)", doc,
                      re.MULTILINE | re.DOTALL)
    assert match, f"{name} is not documented"
    stated = re.search(r"\(default:? ([^)]*?)[,:;)]", " ".join(match.group(1).split()))
    return stated.group(1) if stated else None


@pytest.mark.parametrize("option", CLEAN_OPTIONS, ids=lambda o: o.name)
def test_fit_docstring_states_the_registry_defaults(option):
    """nsclean.fit's docstring documents every option, and a default it states is the
    registry's (it once said outlier_iterations defaults to 2; it was 1)."""
    stated = _stated_default(core.fit.__doc__, option.name)
    if stated is None:
        return
    number = re.match(r"([0-9.]+)(?:/([0-9]+))?", stated)
    if number and not isinstance(option.default, (bool, str)):
        value = float(number.group(1)) / float(number.group(2) or 1)
        assert value == pytest.approx(option.default), (option.name, stated)
    else:
        assert str(option.default).lower() in stated.lower(), (option.name, stated)
