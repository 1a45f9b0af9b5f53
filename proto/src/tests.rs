//! Tests of the contracts themselves: what the descriptor set advertises, that every
//! element of the API is documented, and that the generated Rust paths are where users
//! and the worker expect them.

use std::collections::HashMap;

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    ServiceDescriptorProto,
};

use crate::FILE_DESCRIPTOR_SET;

const INFERENCE_FILE: &str = "switchyard/v1/inference.proto";
const EXPERT_FILE: &str = "switchyard/expert/v1/expert_shard.proto";

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes")
}

fn file<'a>(set: &'a FileDescriptorSet, name: &str) -> &'a FileDescriptorProto {
    set.file
        .iter()
        .find(|f| f.name() == name)
        .unwrap_or_else(|| panic!("{name} is in FILE_DESCRIPTOR_SET"))
}

/// `(method, client_streaming, server_streaming)` for each method of `service`.
fn methods(file: &FileDescriptorProto, service: &str) -> Vec<(String, bool, bool)> {
    let service = file
        .service
        .iter()
        .find(|s| s.name() == service)
        .unwrap_or_else(|| panic!("service {service} in {}", file.name()));
    service
        .method
        .iter()
        .map(|m| {
            (
                m.name().to_owned(),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect()
}

#[test]
fn descriptor_set_has_both_services_and_their_methods() {
    let set = descriptor_set();

    let inference = file(&set, INFERENCE_FILE);
    assert_eq!(inference.package(), "switchyard.v1");
    assert_eq!(inference.syntax(), "proto3");
    assert_eq!(
        methods(inference, "Inference"),
        [
            ("Generate".to_owned(), false, false),
            ("GenerateStream".to_owned(), false, true),
            ("Tokenize".to_owned(), false, false),
            ("ListModels".to_owned(), false, false),
        ]
    );

    let expert = file(&set, EXPERT_FILE);
    assert_eq!(expert.package(), "switchyard.expert.v1");
    assert_eq!(expert.syntax(), "proto3");
    assert_eq!(
        methods(expert, "ExpertShard"),
        [
            ("Forward".to_owned(), false, false),
            ("Describe".to_owned(), false, false),
        ]
    );
}

#[test]
fn generated_service_names_match_the_descriptor_set() {
    use crate::expert::v1::expert_shard_server;
    use crate::inference::v1::inference_server;

    // The worker uses these names as health-check keys and for reflection.
    assert_eq!(inference_server::SERVICE_NAME, "switchyard.v1.Inference");
    assert_eq!(
        expert_shard_server::SERVICE_NAME,
        "switchyard.expert.v1.ExpertShard"
    );
}

#[test]
fn generated_paths_are_where_users_expect_them() {
    use crate::expert::v1::{
        Dtype, ExpertRoute, ForwardRequest, ModelIdentity, RowRoutes, Tensor,
        expert_shard_client::ExpertShardClient,
    };
    use crate::inference::v1::{
        GenerateRequest, SamplingParams, generate_request::Input, generate_stream_response::Event,
        inference_client::InferenceClient,
    };
    use tonic::transport::Channel;

    let _: Option<InferenceClient<Channel>> = None;
    let _: Option<ExpertShardClient<Channel>> = None;
    let _: Option<Event> = None;

    let request = GenerateRequest {
        input: Some(Input::Prompt("Hello".to_owned())),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let decoded = GenerateRequest::decode(request.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, request);

    // Tensor data is `Bytes` (cheap to clone when re-sending to a replica).
    let forward = ForwardRequest {
        model: Some(ModelIdentity {
            model_id: "m".to_owned(),
            fingerprint: "f".to_owned(),
        }),
        layer: 3,
        hidden: Some(Tensor {
            dtype: Dtype::Bf16 as i32,
            shape: vec![1, 2],
            data: crate::Bytes::from_static(&[1, 2, 3, 4]),
        }),
        routes: vec![RowRoutes {
            routes: vec![ExpertRoute {
                expert: 7,
                weight: 0.5,
            }],
        }],
    };
    let decoded = ForwardRequest::decode(forward.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, forward);
    assert_eq!(decoded.hidden.unwrap().matrix_shape(), Ok((1, 2)));
}

/// Source locations by path, as `SourceCodeInfo` numbers them.
struct Comments<'a>(HashMap<&'a [i32], &'a str>);

impl Comments<'_> {
    fn has_doc(&self, path: &[i32]) -> bool {
        self.0.get(path).is_some_and(|c| !c.trim().is_empty())
    }
}

// Field numbers in descriptor.proto, which SourceCodeInfo paths are made of.
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const MESSAGE_ONEOF_DECL: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn join(path: &[i32], more: &[i32]) -> Vec<i32> {
    path.iter().chain(more).copied().collect()
}

fn index(i: usize) -> i32 {
    i32::try_from(i).expect("descriptor index fits i32")
}

fn check_enum(
    e: &EnumDescriptorProto,
    path: &[i32],
    scope: &str,
    docs: &Comments<'_>,
    missing: &mut Vec<String>,
) {
    let name = format!("{scope}{}", e.name());
    if !docs.has_doc(path) {
        missing.push(format!("enum {name}"));
    }
    for (i, v) in e.value.iter().enumerate() {
        if !docs.has_doc(&join(path, &[ENUM_VALUE, index(i)])) {
            missing.push(format!("enum value {name}.{}", v.name()));
        }
    }
}

fn check_message(
    m: &DescriptorProto,
    path: &[i32],
    scope: &str,
    docs: &Comments<'_>,
    missing: &mut Vec<String>,
) {
    let name = format!("{scope}{}", m.name());
    if !docs.has_doc(path) {
        missing.push(format!("message {name}"));
    }
    for (i, f) in m.field.iter().enumerate() {
        if !docs.has_doc(&join(path, &[MESSAGE_FIELD, index(i)])) {
            missing.push(format!("field {name}.{}", f.name()));
        }
    }
    for (i, o) in m.oneof_decl.iter().enumerate() {
        // proto3 `optional` fields get a synthetic oneof with no source of its own.
        let synthetic = m
            .field
            .iter()
            .filter(|f| f.oneof_index == Some(index(i)))
            .all(|f| f.proto3_optional());
        if !synthetic && !docs.has_doc(&join(path, &[MESSAGE_ONEOF_DECL, index(i)])) {
            missing.push(format!("oneof {name}.{}", o.name()));
        }
    }
    let scope = format!("{name}.");
    for (i, nested) in m.nested_type.iter().enumerate() {
        let path = join(path, &[MESSAGE_NESTED_TYPE, index(i)]);
        check_message(nested, &path, &scope, docs, missing);
    }
    for (i, e) in m.enum_type.iter().enumerate() {
        let path = join(path, &[MESSAGE_ENUM_TYPE, index(i)]);
        check_enum(e, &path, &scope, docs, missing);
    }
}

fn check_service(
    s: &ServiceDescriptorProto,
    path: &[i32],
    docs: &Comments<'_>,
    missing: &mut Vec<String>,
) {
    if !docs.has_doc(path) {
        missing.push(format!("service {}", s.name()));
    }
    for (i, m) in s.method.iter().enumerate() {
        if !docs.has_doc(&join(path, &[SERVICE_METHOD, index(i)])) {
            missing.push(format!("rpc {}.{}", s.name(), m.name()));
        }
    }
}

/// The comments are the API reference, so nothing may go without one.
#[test]
fn every_service_rpc_message_field_and_enum_value_is_documented() {
    let set = descriptor_set();
    for name in [INFERENCE_FILE, EXPERT_FILE] {
        let f = file(&set, name);
        let info = f
            .source_code_info
            .as_ref()
            .expect("FILE_DESCRIPTOR_SET keeps source info (comments)");
        let docs = Comments(
            info.location
                .iter()
                .map(|l| (l.path.as_slice(), l.leading_comments()))
                .collect(),
        );
        let mut missing = Vec::new();
        for (i, m) in f.message_type.iter().enumerate() {
            check_message(m, &[FILE_MESSAGE_TYPE, index(i)], "", &docs, &mut missing);
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            check_enum(e, &[FILE_ENUM_TYPE, index(i)], "", &docs, &mut missing);
        }
        for (i, s) in f.service.iter().enumerate() {
            check_service(s, &[FILE_SERVICE, index(i)], &docs, &mut missing);
        }
        assert!(
            missing.is_empty(),
            "{name}: add a leading `//` comment to: {}",
            missing.join(", ")
        );
    }
}

#[test]
fn the_documentation_check_notices_a_missing_comment() {
    // Guard against the check above passing vacuously (for example if paths were wrong).
    let set = descriptor_set();
    let f = file(&set, EXPERT_FILE);
    let info = f.source_code_info.as_ref().unwrap();
    let mut docs = Comments(
        info.location
            .iter()
            .map(|l| (l.path.as_slice(), l.leading_comments()))
            .collect(),
    );
    let field_path = [FILE_MESSAGE_TYPE, 0, MESSAGE_FIELD, 0];
    assert!(docs.has_doc(&field_path));
    docs.0.remove(&field_path[..]);
    let mut missing = Vec::new();
    check_message(
        &f.message_type[0],
        &[FILE_MESSAGE_TYPE, 0],
        "",
        &docs,
        &mut missing,
    );
    let first_field = f.message_type[0].field[0].name();
    assert_eq!(
        missing,
        [format!("field {}.{first_field}", f.message_type[0].name())]
    );
}
