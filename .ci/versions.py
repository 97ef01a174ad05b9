"""Print the versions CI resolved for the packages a newcomer's install depends on."""
from importlib.metadata import PackageNotFoundError, version

names = ["torch", "numpy", "pytest", "triton", "tokenizers", "tqdm", "lm_eval"]
found = []
for name in names:
    try:
        found.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        found.append(f"{name} (not installed)")
print("resolved:", " ".join(found))
