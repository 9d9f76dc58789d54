"""The package version, in one place: `sam3d_hf.__version__`, `sam3d --version`, setup.py and what adapters record."""

__version__ = "0.1.0.dev0"
