import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The ecosystem tier (tests/ecosystem) runs where the real libraries are installed (README:
# Testing); the fast tier's torch build cannot import torchvision, so it does not collect them.
ECOSYSTEM = ("timm", "torchvision", "transformers", "opacus", "lightning")
collect_ignore = [] if all(importlib.util.find_spec(name) for name in ECOSYSTEM) else ["ecosystem"]


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/golden/* from the current output, then fail each rewritten case (review `git diff` and rerun)",
    )


from fixcases import project, zoo  # noqa: E402, F401 - `project`: an empty project folder as working directory; `zoo`: a model zoo installed beside it
from workspace import work  # noqa: E402, F401 - the `work` fixture: a project folder with a model file and a checkpoint
