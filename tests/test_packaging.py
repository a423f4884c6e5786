"""What `pip install .` gives a user: the declared dependencies, the whole package, the `mushroomclip` command."""

import ast
import configparser
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mushroomclip.cli import COMMANDS
from mushroomclip.cli import main as cli_main

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mushroomclip"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, self-references (mushroomclip[app]) left out."""
    return {normalized(Requirement(r).name) for r in requirements} - {"mushroomclip"}


CORE = declared(PROJECT["dependencies"])
EXTRAS = {extra: declared(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}
DISTRIBUTIONS = importlib.metadata.packages_distributions()  # import name -> distributions that provide it


def third_party_imports() -> list[tuple[str, int, str, bool, bool]]:
    """(file, line, import name, at module level, inside a try that handles its failure) for the package."""
    found = []

    def visit(node: ast.AST, module_level: bool, guarded: bool, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                for name in names:
                    top = name.split(".")[0]
                    if getattr(child, "level", 0) == 0 and top not in sys.stdlib_module_names | {"mushroomclip"}:
                        found.append((str(path.relative_to(ROOT)), child.lineno, top, module_level, guarded))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False, guarded, path)
            elif isinstance(child, ast.Try):
                handles = any(
                    h.type is None or re.search(r"\b(ImportError|ModuleNotFoundError|Exception)\b", ast.unparse(h.type))
                    for h in child.handlers
                )
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), module_level, guarded or handles, path)
                for part in [*child.handlers, *child.orelse, *child.finalbody]:
                    visit(part, module_level, guarded, path)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # for type checkers only, never run
            else:
                visit(child, module_level, guarded, path)

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text()), True, False, path)
    return found


def test_every_import_of_the_package_is_a_declared_dependency():
    """A module-level import must be a core dependency (`import mushroomclip.x` works after `pip install .`);
    one inside a function may be an extra's (gradio in the web app); an import whose failure is handled is
    optional by design."""
    problems = []
    for path, line, name, module_level, guarded in third_party_imports():
        providers = {normalized(d) for d in DISTRIBUTIONS.get(name, [])}
        if guarded:
            continue
        if not providers:
            problems.append(f"{path}:{line}: {name} is not installed here, so it cannot be declared")
        elif module_level and not providers & CORE:
            problems.append(f"{path}:{line}: {name} is imported at module level but is not in dependencies")
        elif not providers & (CORE | set().union(*EXTRAS.values())):
            problems.append(f"{path}:{line}: {name} is in neither dependencies nor an extra of pyproject.toml")
    assert not problems, "\n".join(problems)


def test_requirements_txt_installs_the_package_with_existing_extras():
    """requirements.txt (make setup, CI) is the package itself plus extras: one list of dependencies, and every
    extra it names exists (pip only warns about an unknown one and installs less)."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    [editable] = [line for line in lines if line]
    match = re.fullmatch(r"-e \.\[([a-z0-9,-]+)\]", editable)
    assert match, f"requirements.txt should be `-e .[extras]`, got {editable!r}"
    assert set(match[1].split(",")) <= set(EXTRAS)
    assert {"pytest", "selenium", "ruff"} <= EXTRAS["test"] and "pytest" not in CORE


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    ("variables", "torch_line"),
    [
        ([], None),
        (["TORCH=cpu"], "pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch torchvision"),
        (
            ["TORCH=cpu", "TORCH_SPEC=torch==2.14.1 torchvision==0.29.1"],
            "pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1",
        ),
        (["TORCH_SPEC=torch==2.14.1 torchvision==0.29.1"], "pip install --quiet torch==2.14.1 torchvision==0.29.1"),
    ],
)
def test_make_setup_installs_the_torch_build_asked_for(tmp_path, variables, torch_line):
    """`make setup TORCH=cpu` takes the CPU wheels, TORCH_SPEC pins; without either pip's default build, after a
    note on how to choose the CPU wheels (dry run: what make would run)."""
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-n", "-B", f"{venv}/.installed", f"VENV={venv}", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k not in ("TORCH", "TORCH_SPEC")},  # CI exports TORCH_SPEC
    )
    commands = [" ".join(line.split()) for line in result.stdout.splitlines()]
    pip = f"{venv}/bin/python -m pip install --quiet"
    torch_lines = [c for c in commands if c.startswith(pip) and not c.endswith(("requirements.txt", "--upgrade pip"))]
    assert torch_lines == ([] if torch_line is None else [f"{venv}/bin/python -m {torch_line}"])
    requirements = commands.index(f"{pip} -r requirements.txt")
    assert torch_line is None or commands.index(torch_lines[0]) < requirements  # torch before what needs it
    # no choice made: a note (where no NVIDIA GPU is found) says how to avoid the CUDA build
    assert any("make setup TORCH=cpu" in c for c in commands[:requirements]) == (not variables)


def test_mushroomclip_help_lists_every_command(capsys):
    assert cli_main(["--help"]) == 0
    listed = re.findall(r"^  (\S+)  ", capsys.readouterr().out, re.M)
    assert listed == list(COMMANDS)
    assert {"prepare", "evaluate", "train", "predict", "push", "convert"} <= set(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_is_a_module_with_main(name):
    """Each command of the table resolves to an importable module with a ``main(argv)``."""
    assert callable(importlib.import_module(COMMANDS[name][0]).main)


def test_a_command_gets_its_arguments_and_its_exit_status(tmp_path, capsys):
    assert cli_main(["push", str(tmp_path / "nope"), "--repo-id", "someone/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nope'} is not a finished run") and err.count("\n") == 1


def test_a_command_names_itself_in_its_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["convert", "--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: mushroomclip convert ")


def test_an_unknown_command_is_one_line_with_a_suggestion(capsys):
    assert cli_main(["predcit", "photo.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'predcit'; did you mean 'predict'?") and err.count("\n") == 1


def test_no_command_prints_the_usage_as_an_error(capsys):
    assert cli_main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: mushroomclip COMMAND")


def test_the_wheel_installs_a_working_package_and_command(tmp_path):
    """`pip wheel .` (offline, no build isolation) holds every file of the package and the console script; installed
    on its own (--target), it imports and `mushroomclip --help` runs, away from the source tree."""
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(PACKAGE, source / "mushroomclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            str(source),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("mushroomclip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package_files = {p.relative_to(source).as_posix() for p in (source / "mushroomclip").rglob("*") if p.is_file()}
    assert package_files - names == set(), "files of the package folder missing from the wheel"
    assert any(n.startswith("mushroomclip/resources/") and n.endswith(".csv") for n in names)
    entry_points = configparser.ConfigParser()
    entry_points.read_string(
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
    assert dict(entry_points["console_scripts"]) == {"mushroomclip": "mushroomclip.cli:main"}

    target = tmp_path / "installed"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import mushroomclip; print(len(mushroomclip.load_taxonomy()), mushroomclip.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    species, location = where.stdout.split()
    assert Path(location).is_relative_to(target) and int(species) == 169  # the bundled table, read from the install
    script = subprocess.run(
        [str(target / "bin" / "mushroomclip"), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert script.returncode == 0, script.stderr
    assert all(name in script.stdout for name in COMMANDS)


def test_the_code_is_ruff_formatted_and_lint_clean_without_fmt_skip():
    """ruff's formatting and lint rules (pyproject.toml) hold everywhere, with no line exempted from formatting."""
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    exemptions = [f"# fmt: {word}" for word in ("skip", "off")]  # built here, so this file does not hold them
    assert not [f for f in files if any(exempt in (ROOT / f).read_text() for exempt in exemptions)]
    for args in (["format", "--check"], ["check"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *args, *files], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
