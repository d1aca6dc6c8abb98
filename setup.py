"""Maps the three top-level folders into the `odyssey` namespace (see DESIGN.md, Layout)."""

from setuptools import Extension, find_packages, setup

PACKAGE_ROOTS = {
    "odyssey": "odyssey",
    "odyssey.pipelines": "pipelines",
    "odyssey.tokenizer": "tokenizer",
    "odyssey.kernels": "kernels",
}


def _packages() -> list[str]:
    names = []
    for name, folder in PACKAGE_ROOTS.items():
        names.append(name)
        names += [f"{name}.{sub}" for sub in find_packages(folder)]
    return names


# The compiled FHIR reader (our own C, no dependency): optional, so an install where it cannot be built
# still works and ingestion takes its Python paths (pipelines/fhir_scan.py).
FHIR_SCAN = Extension(
    "odyssey.pipelines._fhir_scan",
    sources=["pipelines/_fhir_scan.c"],
    extra_compile_args=["-O2", "-std=c11"],
    optional=True,
)


setup(
    ext_modules=[FHIR_SCAN],
    packages=_packages(),
    package_dir=PACKAGE_ROOTS,
    package_data={"odyssey.pipelines": ["*.yaml"], "odyssey": ["configs/*.yaml"]},
    include_package_data=True,
)
