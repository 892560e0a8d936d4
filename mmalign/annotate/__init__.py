"""``mmalign annotate``: a preference-labelling web page (Starlette + uvicorn, one static HTML/JS page).

items.py reads manifests into items, store.py keeps the append-only labels file and the assignment,
server.py is the web app, export.py turns labels into training manifests and agreement statistics.
The server's dependencies are the optional extra ``mmalign[annotate]``; export and stats need none.
"""
