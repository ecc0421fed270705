"""AP-BMM search: asynchronous, prior-guided, multi-objective layer-wise merging.

Small pieces, each testable alone, wired together by the coordinator:

- ``space``        decision vector (one coefficient per layer group + head) → merge spec
- ``objectives``   anchored normalisation (base ≈ (0, 1), reasoning ≈ (1, 0)), hypervolume
- ``prior``        robust normalisation, smoothing, importance → ARD lengthscales
- ``source_diff``  per-layer weight and activation differences of the two sources
- ``surrogate``    one Matern-5/2 ARD GP per objective
- ``acquisition``  qLogNEHVI with in-flight candidates as pending points
- ``rerank``       gap-aware, pending-repelling batch selection
- ``algorithms``   apbmm, sync-qnehvi, sobol, grid-ta, grid-ties behind one interface
- ``workers``      evaluator processes (the coordinator alone writes the catalog)
- ``coordinator``  the asynchronous loop; ``store`` and ``report`` its catalog rows
- ``harvest``, ``plots``  the Pareto set as models, and pictures of a search
"""
