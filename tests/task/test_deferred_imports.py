"""flwr-datasets' plotting package is imported only when used (task.deferred_imports)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_partitioning_does_not_import_plotting_libraries() -> None:
    out = run_python("""
        import sys
        from datasets import Dataset
        from task.data import load_partition
        from task.settings import DataSettings
        train = Dataset.from_dict({"text": [str(i) for i in range(40)], "label": [0] * 40})
        part = load_partition(train, DataSettings(partitioner="iid"), partition_id=1,
                              num_partitions=4)
        print(len(part), "seaborn" in sys.modules, "matplotlib.pyplot" in sys.modules)
    """)
    assert out == "10 False False"


def test_plotting_package_still_loads_on_first_use() -> None:
    out = run_python("""
        import sys
        from task.deferred_imports import defer_flwr_datasets_plotting
        assert defer_flwr_datasets_plotting()
        assert not defer_flwr_datasets_plotting()  # once only
        import flwr_datasets
        from flwr_datasets.partitioner import IidPartitioner
        print("seaborn" in sys.modules, end=" ")
        plot = flwr_datasets.visualization.plot_label_distributions
        from flwr_datasets.visualization import plot_comparison_label_distribution
        real = sys.modules["flwr_datasets.visualization"]
        print(callable(plot), callable(plot_comparison_label_distribution),
              flwr_datasets.visualization is real, "seaborn" in sys.modules)
    """)
    assert out == "False True True True True"


def test_no_stand_in_once_flwr_datasets_is_imported() -> None:
    out = run_python("""
        import flwr_datasets
        from task.deferred_imports import defer_flwr_datasets_plotting
        print(defer_flwr_datasets_plotting(), type(flwr_datasets.visualization).__name__)
    """)
    assert out == "False module"
