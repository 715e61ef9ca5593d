import pytest

from report_fakes import make_plan_dict


@pytest.fixture(scope="session")
def plan_dict() -> dict:
    """One plan across world sizes 1, 2, 4, 8 (traced once per session: a few seconds)."""
    return make_plan_dict()


@pytest.fixture(autouse=True)
def _close_figures():
    """Sections built without rendering keep their figures open: close them after each test."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
