"""Preference models trained on the pairs prefdata makes: Bradley–Terry reward models and
General Preference Models (GPM), their features, training, saving, evaluation and the
intransitivity report. See ``heads.py`` for the two heads and their losses."""
