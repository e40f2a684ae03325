"""No module of the app imports itself back through a circle, imports inside functions included.

The floors themselves (which package may import which) are import-linter's layers contract in
pyproject.toml, checked by `make lint`; a floor is a package, so only this test sees a circle
between two modules of one package, or between a package and its own modules.
"""

from __future__ import annotations

import grimp


def test_no_module_of_the_app_imports_itself_through_a_circle() -> None:
    # No cache: grimp's keeps a file's imports while the file is unchanged, even once a module
    # it imports has appeared or gone.
    graph = grimp.build_graph("app", cache_dir=None)

    # A circle passes through some direct import whose target leads back to the importer.
    circles = [
        (module, *(graph.find_shortest_chain(importer=imported, imported=module) or ()))
        for module in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(module))
        if graph.chain_exists(importer=imported, imported=module)
    ]

    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)
