//! Library-level tests of the whole workspace, one module per subject, in one test binary (each
//! binary links its own copy of Burn).

mod artifact;
mod fixtures;
mod real_pair;
