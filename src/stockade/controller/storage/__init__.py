"""Controller storage: SQLAlchemy tables and engine (db), the object repository (store), the flow store, migrations."""
