"""The AI service routes under ``/v1``, one router per family, each route behind its
own scope (see :mod:`reference_app.catalogue`)."""
