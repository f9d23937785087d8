"""``fedsparse deploy``: a Flower Deployment Engine federation owned by one folder.

A deployment folder holds everything a federation outside simulation needs: its manifest
(``manifest.py``), a CA and the SuperLink's certificate and each SuperNode's key
(``pki.py``), MLflow's credentials, the registry of which registered node serves which
partition, the long-lived services' pidfiles and logs (``daemons.py``), and the run folders
of the scenarios submitted to it. ``programs.py`` is the one place that says which program
each service runs with which flags (``fedsparse deploy up`` and ``docker-compose.yml`` both
use it).
"""
