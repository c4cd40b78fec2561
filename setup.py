"""keras-oneimage: learn CNN early layers from a single image (Asano et al., ICLR 2020)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "keras_oneimage" / "__init__.py").read_text()).group(1)

setup(
    name="keras-oneimage",
    version=VERSION,
    description="Learn the first layers of a CNN from one image with self-supervision (Keras 3 / TensorFlow).",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_oneimage", "keras_oneimage.*"]),
    # Declared flat layout: `pip install -e .` then writes a plain .pth to the checkout instead of an import hook,
    # whose install prints a warning that looks like an error to a newcomer.
    package_dir={"": "."},
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.3,<4",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets 4.9.x imports it without declaring it
        "keras-tuner[bayesian]>=1.4",  # the default Bayesian search needs scipy and scikit-learn
        "tensorboard>=2.16",  # keras-tuner needs it importable on the TF backend
        "absl-py>=1.0",
        "matplotlib>=3.7",
        "numpy>=1.26",
        "pillow>=10",
        "starlette>=0.37",
        "uvicorn>=0.29",
        "orjson>=3.9",  # the REST server encodes feature maps with it (4x faster than json)
        "tensorflow-serving-api>=2.16,<2.22",  # the gRPC server's protos and stubs (and grpcio); matches tensorflow
    ],
    extras_require={
        # kymatio 0.3 is imported through its 2-D TensorFlow frontend only (keras_oneimage/models/scattering.py):
        # its 3-D code needs scipy.special.sph_harm, gone from SciPy 1.15, so no SciPy pin is needed.
        "scattering": ["kymatio>=0.3,<0.4"],
        "test": ["pytest>=8", "httpx>=0.27", "kymatio>=0.3,<0.4"],
        "bench": ["torch==2.13.0", "faiss-cpu"],  # peers measured by experiments/bench_*.py only
    },
    entry_points={"console_scripts": ["keras-oneimage=keras_oneimage.cli:run"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
