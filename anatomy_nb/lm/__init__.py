"""The language-model layer: models, SAEs, and the model operations every stage shares (this
package imports torch; nothing that only reads results does)."""
