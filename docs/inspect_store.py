# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Inspecting a tvr feature store
#
# Opens the store given as the first argument (`python docs/inspect_store.py STORE`) or by `$TVR_STORE`, or
# builds a small demo store when neither is given, then shows the items table, per-feature coverage, the most
# common failure/absence reasons, masks of a few rows and the availability figure. The figure is saved under
# `$TVR_INSPECT_OUT` (default: the current directory). Open it as a notebook with
# `jupytext --to notebook docs/inspect_store.py`, or run it as a script. The test suite executes it
# (tests/test_store_inspect.py).

# %%
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from store import FeatureStore, Status
from store.inspect import availability_figure, coverage_table, demo_store, reason_counts, status_dataarray

out_dir = Path(os.environ.get("TVR_INSPECT_OUT", "."))
out_dir.mkdir(parents=True, exist_ok=True)
# a script argument wins; inside a Jupyter kernel, sys.argv holds the kernel's own "-f ..." options instead
args = [a for a in sys.argv[1:] if not a.startswith("-")] if "ipykernel" not in sys.modules else []
url = args[0] if args else os.environ.get("TVR_STORE")
if url:
    store = FeatureStore.open(url)
else:
    url = str(Path(tempfile.mkdtemp(prefix="tvr_demo_")) / "demo.zarr")
    store = demo_store(url)
print(store)

# %% [markdown]
# ## Items and captions
# The root group is a plain xarray Dataset: one variable per column, `item` / `caption` dimensions.

# %%
root = xr.open_zarr(url, consolidated=False)
print(root[["item_kind", "item_split", "item_duration"]].isel(item=slice(0, 5)).load())
print("captions per item:", np.bincount(store.captions().item, minlength=store.n_items)[:10], "...")

# %% [markdown]
# ## Coverage per feature
# Availability is `status == OK`; ABSENT means the modality does not exist (no audio, no face), FAILED
# carries a reason and a message, PENDING rows were never finished.

# %%
print(coverage_table(store))
for name in store.features:
    for status in (Status.FAILED, Status.ABSENT):
        common = reason_counts(store, name, status, top=3)
        if common:
            print(f"{name}: {status.name.lower()} because {common}")

# %% [markdown]
# ## Masks and times of a few rows
# `read` returns float32 values padded to `max_steps`, a step mask (False on every step of a row that is not
# OK), the time of each step in seconds (NaN past the last step) and the availability flag.

# %%
item_features = [n for n in store.features if store.spec(n).axis == "item"]
if item_features:
    name = item_features[0]
    batch = store.read(name, range(min(4, store.n_items)))
    print(name, "values", batch.values.shape, "available", batch.available)
    print("mask\n", batch.mask.astype(int))
    print("time\n", np.round(batch.time, 2))
    ds = store.to_xarray(name)
    print(ds)

# %% [markdown]
# ## Availability figure

# %%
status = status_dataarray(store)
print("fraction OK per feature:", (status == int(Status.OK)).mean("item").to_pandas().round(2).to_dict())
fig = availability_figure(store)
figure_path = out_dir / "store_availability.png"
fig.savefig(figure_path, dpi=100)
print(f"saved {figure_path}")
fig
