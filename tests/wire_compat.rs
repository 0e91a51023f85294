//! Wire compatibility of `proto/` with the reference protos shipped in the
//! pinned PyPI packages (indexify==0.4.56, tensorlake==0.3.9): packages,
//! services, rpcs and streaming flags, every message's fields (name, number,
//! type, label, proto3 optional, oneof, type name), nested types, and every
//! enum value. Comments and file names are ours and are not compared.

mod support;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

fn reference() -> Result<Vec<FileDescriptorProto>> {
    let script = support::repo_root().join("tests/wire_compat/dump_reference.py");
    let out = std::process::Command::new(support::venv().join("bin/python"))
        .arg(&script)
        .output()
        .context("running dump_reference.py")?;
    anyhow::ensure!(
        out.status.success(),
        "dump_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: BTreeMap<String, String> = serde_json::from_slice(&out.stdout)?;
    map.values()
        .map(|h| Ok(FileDescriptorProto::decode(hex::decode(h)?.as_slice())?))
        .collect()
}

fn ours() -> Result<Vec<FileDescriptorProto>> {
    Ok(FileDescriptorSet::decode(steward_proto::FILE_DESCRIPTOR_SET)?.file)
}

fn describe_field(f: &prost_types::FieldDescriptorProto, parent: &DescriptorProto) -> String {
    let oneof = f
        .oneof_index
        .and_then(|i| parent.oneof_decl.get(i as usize))
        .and_then(|o| o.name.clone());
    format!(
        "number={} type={:?} label={:?} type_name={} proto3_optional={} oneof={}",
        f.number(),
        f.r#type(),
        f.label(),
        f.type_name(),
        f.proto3_optional(),
        // Synthetic oneofs of proto3 `optional` fields are named after the field; real ones matter.
        if f.proto3_optional() {
            "-".to_string()
        } else {
            oneof.unwrap_or_else(|| "-".into())
        }
    )
}

fn compare_message(
    path: &str,
    want: &DescriptorProto,
    got: &DescriptorProto,
    diffs: &mut Vec<String>,
) {
    let wf: BTreeMap<_, _> = want
        .field
        .iter()
        .map(|f| (f.name().to_string(), describe_field(f, want)))
        .collect();
    let gf: BTreeMap<_, _> = got
        .field
        .iter()
        .map(|f| (f.name().to_string(), describe_field(f, got)))
        .collect();
    for (name, w) in &wf {
        match gf.get(name) {
            None => diffs.push(format!("{path}.{name}: field missing in ours")),
            Some(g) if g != w => {
                diffs.push(format!("{path}.{name}: reference has {w}, ours has {g}"))
            }
            _ => {}
        }
    }
    for name in gf.keys().filter(|n| !wf.contains_key(*n)) {
        diffs.push(format!("{path}.{name}: field not in the reference"));
    }
    compare_named(
        path,
        &want.nested_type,
        &got.nested_type,
        diffs,
        compare_message,
    );
    compare_named(path, &want.enum_type, &got.enum_type, diffs, compare_enum);
}

fn compare_enum(
    path: &str,
    want: &EnumDescriptorProto,
    got: &EnumDescriptorProto,
    diffs: &mut Vec<String>,
) {
    let wv: BTreeMap<_, _> = want
        .value
        .iter()
        .map(|v| (v.name().to_string(), v.number()))
        .collect();
    let gv: BTreeMap<_, _> = got
        .value
        .iter()
        .map(|v| (v.name().to_string(), v.number()))
        .collect();
    if wv != gv {
        for (n, w) in &wv {
            match gv.get(n) {
                None => diffs.push(format!("{path}.{n}: enum value missing in ours")),
                Some(g) if g != w => diffs.push(format!("{path}.{n}: reference = {w}, ours = {g}")),
                _ => {}
            }
        }
        for n in gv.keys().filter(|n| !wv.contains_key(*n)) {
            diffs.push(format!("{path}.{n}: enum value not in the reference"));
        }
    }
}

trait Named {
    fn item_name(&self) -> &str;
}
impl Named for DescriptorProto {
    fn item_name(&self) -> &str {
        self.name()
    }
}
impl Named for EnumDescriptorProto {
    fn item_name(&self) -> &str {
        self.name()
    }
}

fn compare_named<T: Named>(
    path: &str,
    want: &[T],
    got: &[T],
    diffs: &mut Vec<String>,
    cmp: fn(&str, &T, &T, &mut Vec<String>),
) {
    for w in want {
        let p = format!("{path}.{}", w.item_name());
        match got.iter().find(|g| g.item_name() == w.item_name()) {
            None => diffs.push(format!("{p}: missing in ours")),
            Some(g) => cmp(&p, w, g, diffs),
        }
    }
    for g in got
        .iter()
        .filter(|g| !want.iter().any(|w| w.item_name() == g.item_name()))
    {
        diffs.push(format!("{path}.{}: not in the reference", g.item_name()));
    }
}

/// Every difference between the two sets of files, keyed by package.
fn diff(reference: &[FileDescriptorProto], ours: &[FileDescriptorProto]) -> Vec<String> {
    let mut diffs = Vec::new();
    for want in reference {
        let pkg = want.package();
        let Some(got) = ours.iter().find(|f| f.package() == pkg) else {
            diffs.push(format!("package {pkg}: missing in ours"));
            continue;
        };
        if want.syntax() != got.syntax() {
            diffs.push(format!(
                "package {pkg}: syntax {:?} vs {:?}",
                want.syntax(),
                got.syntax()
            ));
        }
        compare_named(
            pkg,
            &want.message_type,
            &got.message_type,
            &mut diffs,
            compare_message,
        );
        compare_named(
            pkg,
            &want.enum_type,
            &got.enum_type,
            &mut diffs,
            compare_enum,
        );
        for ws in &want.service {
            let Some(gs) = got.service.iter().find(|s| s.name() == ws.name()) else {
                diffs.push(format!("{pkg}.{}: service missing in ours", ws.name()));
                continue;
            };
            let sig = |m: &prost_types::MethodDescriptorProto| {
                format!(
                    "input={} output={} client_streaming={} server_streaming={}",
                    m.input_type(),
                    m.output_type(),
                    m.client_streaming(),
                    m.server_streaming()
                )
            };
            for wm in &ws.method {
                match gs.method.iter().find(|m| m.name() == wm.name()) {
                    None => diffs.push(format!(
                        "{pkg}.{}.{}: rpc missing in ours",
                        ws.name(),
                        wm.name()
                    )),
                    Some(gm) if sig(gm) != sig(wm) => diffs.push(format!(
                        "{pkg}.{}.{}: reference {}, ours {}",
                        ws.name(),
                        wm.name(),
                        sig(wm),
                        sig(gm)
                    )),
                    _ => {}
                }
            }
            for gm in gs
                .method
                .iter()
                .filter(|m| !ws.method.iter().any(|w| w.name() == m.name()))
            {
                diffs.push(format!(
                    "{pkg}.{}.{}: rpc not in the reference",
                    ws.name(),
                    gm.name()
                ));
            }
        }
        for gs in got
            .service
            .iter()
            .filter(|s| !want.service.iter().any(|w| w.name() == s.name()))
        {
            diffs.push(format!("{pkg}.{}: service not in the reference", gs.name()));
        }
    }
    diffs
}

#[test]
fn our_protos_match_the_reference_item_by_item() -> Result<()> {
    let reference = reference()?;
    assert_eq!(
        reference.len(),
        3,
        "expected executor_api, function_executor and status"
    );
    let diffs = diff(&reference, &ours()?);
    assert!(
        diffs.is_empty(),
        "wire drift from the reference protos:\n{}",
        diffs.join("\n")
    );
    Ok(())
}

#[test]
fn a_changed_field_number_is_reported_by_name() -> Result<()> {
    let reference = reference()?;
    let mut ours = ours()?;
    let file = ours
        .iter_mut()
        .find(|f| f.package() == "executor_api_pb")
        .context("executor_api_pb")?;
    let msg = file
        .message_type
        .iter_mut()
        .find(|m| m.name() == "AllocationResult")
        .context("AllocationResult")?;
    let field = msg
        .field
        .iter_mut()
        .find(|f| f.name() == "execution_duration_ms")
        .context("field")?;
    field.number = Some(11);
    let diffs = diff(&reference, &ours);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(
        diffs[0].starts_with(
            "executor_api_pb.AllocationResult.execution_duration_ms: reference has number=10"
        ),
        "{}",
        diffs[0]
    );
    assert!(diffs[0].contains("ours has number=11"), "{}", diffs[0]);
    Ok(())
}

#[test]
fn a_renamed_enum_value_and_a_streaming_flag_are_reported() -> Result<()> {
    let reference = reference()?;
    let mut ours = ours()?;
    let fe = ours
        .iter_mut()
        .find(|f| f.package() == "function_executor_service")
        .context("fe")?;
    let svc = fe.service.iter_mut().next().context("service")?;
    let watch = svc
        .method
        .iter_mut()
        .find(|m| m.name() == "watch_allocation_state")
        .context("rpc")?;
    watch.server_streaming = Some(false);
    let e = fe
        .enum_type
        .iter_mut()
        .find(|e| e.name() == "AllocationFailureReason")
        .context("enum")?;
    e.value[3].number = Some(7);
    let diffs = diff(&reference, &ours);
    assert!(
        diffs
            .iter()
            .any(|d| d.contains("watch_allocation_state") && d.contains("server_streaming=true")),
        "{diffs:?}"
    );
    assert!(diffs.iter().any(|d| d.contains("AllocationFailureReason.ALLOCATION_FAILURE_REASON_REQUEST_ERROR: reference = 3, ours = 7")), "{diffs:?}");
    Ok(())
}
