//! Artifact sync tests (issue 4, item 2): owned by the artifacts work.
