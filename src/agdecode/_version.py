"""The package version, on the ground floor: modules that record it import it from here, not from the package."""
__version__ = "0.1.0"
