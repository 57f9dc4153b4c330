"""qbnorm export: the augmented gallery vectors that serve a method from any inner-product index."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, methods
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.io.probefile import Probe


@shared.budget
@shared.overwriting
@shared.reporting
@shared.method_parameters
def command(
    ctx: typer.Context,
    probe: Annotated[str, typer.Option("--probe", help="Probe file of this gallery, from `qbnorm probe`.")],
    gallery: Annotated[str, typer.Option("--gallery", help="Gallery embeddings (the probed gallery).")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="OUT", help="Output: an HDF5 file (--format hdf5) or a directory (npy, faiss, lancedb).")],
    method: Annotated[str | None, typer.Option("--method", metavar="|".join(methods.METHODS), help=f"Normaliser (default {methods.DEFAULT.name}); every method but the rank-based one is exportable.")] = None,
    *,
    params: dict,
    params_file: Annotated[str | None, typer.Option("--params", metavar="PARAMS.json", help="Settings from `qbnorm tune` (explicit options override).")] = None,
    format: Annotated[str, typer.Option("--format", metavar="hdf5|npy|faiss|lancedb", help="hdf5: one qbnorm file (kind index-vectors); npy: vectors.npy + gate.npy + recipe.json; faiss: index.faiss + …; lancedb: a LanceDB table.")] = "hdf5",
    index_type: Annotated[str, typer.Option("--index-type", metavar="flat|hnsw|ivf", help="faiss index: exact flat, or approximate HNSW / IVF.")] = "flat",
    hnsw_m: Annotated[int, typer.Option("--hnsw-m", metavar="M", help="HNSW: neighbours per node.")] = 32,
    ef_construction: Annotated[int, typer.Option("--ef-construction", metavar="N", help="HNSW: candidate list while building.")] = 200,
    ef_search: Annotated[int, typer.Option("--ef-search", metavar="N", help="HNSW: candidate list while searching (search --ef-search overrides).")] = 128,
    nlist: Annotated[int | None, typer.Option("--nlist", metavar="N", help="IVF: inverted lists (default 4·√gallery).")] = None,
    nprobe: Annotated[int, typer.Option("--nprobe", metavar="N", help="IVF: lists probed per query (search --nprobe overrides).")] = 16,
    constant: Annotated[float | None, typer.Option("--constant", metavar="C", help="The query's constant c (default: the smallest power of two that keeps the extra column inside the coordinates' range; see docs/serving.md).")] = None,
    similarity: Annotated[str | None, typer.Option("--similarity", metavar="cosine|dot", help="Default: as the probe (cosine: rows L2-normalised).")] = None,
    memory: str,
    block_rows: int | None,
    force: bool,
    accept_mismatch: options.AcceptMismatch = False,
    report: Reporter,
) -> None:
    """Export the augmented gallery vectors [g, −(offset − m)/(scale·c)]: any inner-product index
    (faiss, LanceDB, Qdrant, Milvus, pgvector, Elasticsearch kNN …) then returns the method's
    normalised ranking for the query [q, c], and the raw one for [q, 0].

    Search with the inner-product (dot) metric only: cosine renormalises the augmented vectors.
    Gated methods also write each item's activation flag (gate). `qbnorm search` runs queries
    against the export; the recipe (query constant c, η = scale·score − m) is in its attributes.

    Example: qbnorm export --probe probe.h5 --gallery g.h5 --method dis --format faiss --index-type hnsw -o dis.index
    """
    tuned = api.load_params(params_file) if params_file else None
    chosen = options.with_params(tuned, method=method, **params)
    chosen["method"] = chosen["method"] or methods.DEFAULT.name
    with report.capture(), Probe.load(probe) as probed:
        exported = api.export(
            probed, gallery, **chosen, similarity=similarity, constant=constant, format=format, index_type=index_type,
            hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
            memory=memory, block_rows=block_rows, output=output, force=force, accept_mismatch=accept_mismatch,
            progress=report.progress, provenance=options.provenance(ctx), extra_params={"params_file": params_file})
    recipe = exported.recipe
    gate = f"; gate on {100 * recipe['gate_share']:.1f}% of the items" if recipe["gated"] else ""
    report.info(f"wrote {output}: {format} export of {recipe['gallery_rows']} vectors of dimension "
                f"{recipe['dim'] + 1}, method {recipe['method']}{gate}; append c = {recipe['constant']:g} to each "
                f"query{' (L2-normalised)' if recipe['normalise_queries'] else ''} for the normalised ranking, 0 for "
                f"the raw one; η = {recipe['scale']:g}·score − {recipe['center']:.6g}; search with the dot metric only")
    report.result({"output": output, "format": format, "uuid": exported.uuid, "recipe": recipe})


command.__doc__ += "\n\nMethods:\n\n" + methods.help_text()
