"""Build the optional compiled kernels (qpack/_ckernels.c). Everything else is in
pyproject.toml. The build may fail (no C compiler): qpack then runs its numpy code, which
gives the same results, only slower."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "qpack._ckernels",
            ["qpack/_ckernels.c"],
            # two rounded float32 operations per value, as the spec says: never fused.
            # No trapping math: IEEE results are unchanged (no program here traps on
            # them), and loops with comparisons and conversions vectorize.
            extra_compile_args=[
                "-O3",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-fno-trapping-math",
            ],
            optional=True,
        )
    ]
)
