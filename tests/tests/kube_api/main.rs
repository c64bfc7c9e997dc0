//! The `kube_api` tier: the real `egressgate` binary in the lab's node namespace, with pod
//! identities from a real Kubernetes API server (etcd + kube-apiserver, built by
//! `scripts/kube-tools` and cached by version), real RBAC and real watch semantics.
//!
//! Needs what the e2e tests need, plus Go 1.26 the first time (to build kube-apiserver) and
//! Debian's etcd-server (installed on first use). The e2e tier's fake API server
//! (`gateway/tests/fake_apiserver`) stays only for what a real server cannot be made to do.

mod failures;
mod helm;
mod identity;
mod support;
