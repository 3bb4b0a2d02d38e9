from setuptools import find_packages, setup

setup(
    name="mulclip-kernels",
    version="0.1.0",
    description="Fused kernels and a training package for MulCLIP (multi-level long-caption CLIP alignment)",
    packages=find_packages(include=["mulclip_kernels", "mulclip_kernels.*", "mulclip", "mulclip.*"]),
    package_data={"": ["../csrc/*"]},
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
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
    },
)
