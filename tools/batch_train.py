"""Old name of `python -m batch`, kept for the 0.1 release only (docs/batch.md); the trainer is the batch/ package."""
import runpy

if __name__ == "__main__":
    runpy.run_module("batch", run_name="__main__", alter_sys=True)
