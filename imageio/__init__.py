"""imageio: serve virtual machine disk images to ticket holders."""

__version__ = "0.1.0"
