//! The ramsnap gRPC contract, generated from `proto/` at build time.

/// Encoded `FileDescriptorSet` of every ramsnap proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ramsnap_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("ramsnap.common.v1");
    }
}

pub mod storage {
    pub mod v1 {
        tonic::include_proto!("ramsnap.storage.v1");
    }
}

pub mod host {
    pub mod v1 {
        tonic::include_proto!("ramsnap.host.v1");
    }
}

pub mod snapshot {
    pub mod v1 {
        tonic::include_proto!("ramsnap.snapshot.v1");
    }
}
