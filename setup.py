from setuptools import find_packages, setup

setup(
    name="mulclip-kernels",
    version="0.1.0",
    description="Fused kernels and a training package for MulCLIP (multi-level long-caption CLIP alignment)",
    packages=find_packages(include=["mulclip_kernels", "mulclip_kernels.*", "mulclip", "mulclip.*"]),
    # The compiled extensions build from csrc/ in the source tree on first use (editable install).
    package_data={"mulclip": ["model_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "triton",
        "open_clip_torch",
        "einops",
        "numpy",
        "ninja",
        "webdataset",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
    },
)
