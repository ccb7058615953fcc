# frozen_string_literal: true

require "stringio"

# Walks the public API of the reference gem 0.9.0 (/work/shared/reference/API-0.9.0.md,
# section 2) item by item for the classes this gem implements: every constant, method,
# positional arity and keyword name a caller of the reference can use must be accepted
# here (a compatible superset is fine: extra optional arguments, a block form). Return
# classes that need a VM are checked in spec/integration/reference_api_live_spec.rb.
#
# Out of scope (other issues): networking, SSH, the agent client. Volumes and snapshots:
# the `Volume*` and `Snapshot*` checks below.
RSpec.describe "reference gem 0.9.0 API compatibility" do
  # A reference signature: `req` positional arguments always passed, `opt` more that may be
  # passed, `keys` keyword names.
  def sig(req = 0, opt = 0, *keys) = { req: req, opt: opt, keys: keys }

  # Checks that `meth` (a Method or UnboundMethod) can be called as `sig` describes.
  def accepts!(owner, name, meth, sig)
    params = meth.parameters
    where = "#{owner}##{name} #{params.inspect}"
    req = params.count { |t, _| t == :req }
    opt = params.count { |t, _| t == :opt }
    rest = params.any? { |t, _| t == :rest }
    expect(req).to be <= sig[:req], "#{where}: needs #{req} positional arguments, the reference passes #{sig[:req]}"
    expect(rest || req + opt >= sig[:req] + sig[:opt]).to be(true), "#{where}: cannot take #{sig[:req] + sig[:opt]} positional arguments"
    keys = params.select { |t, _| %i[key keyreq].include?(t) }.map(&:last)
    keyrest = params.any? { |t, _| t == :keyrest }
    sig[:keys].each do |k|
      expect(keyrest || keys.include?(k)).to be(true), "#{where}: no keyword #{k}:"
    end
    extra_required = params.select { |t, _| t == :keyreq }.map(&:last) - sig[:keys]
    expect(extra_required).to be_empty, "#{where}: requires keywords the reference does not have: #{extra_required}"
  end

  def check_instance(klass, methods)
    methods.each do |name, sig|
      expect(klass.public_method_defined?(name)).to be(true), "#{klass}##{name} is missing"
      accepts!(klass, name, klass.instance_method(name), sig)
    end
  end

  def check_singleton(mod, methods)
    methods.each do |name, sig|
      expect(mod.respond_to?(name)).to be(true), "#{mod}.#{name} is missing"
      accepts!(mod, name, mod.method(name), sig)
    end
  end

  ms = Microsandbox

  it "has every namespace constant of the exec, filesystem, metrics, logs and patch areas" do
    %i[Sandbox ExecOutput ExecEvent ExecHandle ExecStdin ExitStatus FS FsEntry FsMetadata FsReadStream
       FsWriteSink Metrics MetricsStream LogStream LogEntry Patch].each do |c|
      expect(ms.const_defined?(c, false)).to be(true), "Microsandbox::#{c} is missing"
    end
    expect(ms::Patch).to be_a(Module)
    [ms::ExecHandle, ms::FsReadStream, ms::MetricsStream, ms::LogStream].each { |k| expect(k).to include(Enumerable) }
  end

  it "Sandbox: exec, shell, streams, fs, metrics and logs with the reference's arguments" do
    exec_keys = %i[cwd user env timeout tty stdin rlimits]
    check_instance(ms::Sandbox, {
                     name: sig, exec: sig(1, 1, *exec_keys), shell: sig(1, 0, *exec_keys),
                     exec_stream: sig(1, 1, *exec_keys), shell_stream: sig(1, 0, *exec_keys),
                     fs: sig, metrics: sig, metrics_stream: sig(0, 0, :interval),
                     logs: sig(0, 0, :tail, :since_ms, :until_ms, :sources),
                     log_stream: sig(0, 0, :sources, :since_ms, :from_cursor, :until_ms, :follow),
                     attach: sig(1, 1, :cwd, :user, :env, :detach_keys, :rlimits), attach_shell: sig
                   })
    # Defaults the reference documents: logs(tail: nil) is everything, sources nil is all.
    params = ms::Sandbox.instance_method(:logs).parameters
    expect(params).to include(%i[key tail], %i[key sources])
  end

  it "ExecOutput, ExecEvent, ExitStatus" do
    check_instance(ms::ExecOutput, { exit_code: sig, success?: sig, failure?: sig, stdout: sig, stderr: sig,
                                     stdout_bytes: sig, stderr_bytes: sig, to_s: sig })
    check_instance(ms::ExecEvent, { type: sig, pid: sig, code: sig, data: sig, text: sig, started?: sig,
                                    stdout?: sig, stderr?: sig, exited?: sig, failed?: sig, stdin_error?: sig })
    check_instance(ms::ExitStatus, { exit_code: sig, success?: sig, failure?: sig })

    out = ms::ExecOutput.new(exit_code: 1, signal: nil, stdout: "a\xFF".b, stderr: "")
    expect([out.exit_code, out.success?, out.failure?]).to eq([1, false, true])
    expect(out.stdout).to be_a(String).and(satisfy(&:valid_encoding?))
    expect(out.stdout_bytes.encoding).to eq(Encoding::BINARY)
    expect(out.to_s).to eq(out.stdout)
    ev = ms::ExecEvent.new(:stdout, bytes: "x".b)
    expect([ev.type, ev.data, ev.text, ev.code, ev.pid]).to eq([:stdout, "x".b, "x", nil, nil])
    expect(ms::ExecEvent.new(:exited, exit_code: 0).text).to be_nil
    expect(ms::ExitStatus.new(exit_code: 0)).to have_attributes(success?: true, failure?: false)
  end

  it "ExecHandle and ExecStdin" do
    check_instance(ms::ExecHandle, { id: sig, each: sig, wait: sig, collect: sig, signal: sig(1), kill: sig,
                                     resize: sig(2), stdin: sig })
    check_instance(ms::ExecStdin, { write: sig(1), close: sig })
  end

  it "FS and its value and stream classes" do
    check_instance(ms::FS, {
                     read: sig(1), read_text: sig(1), write: sig(2), list: sig(1), mkdir: sig(1), remove: sig(1),
                     remove_dir: sig(1), copy: sig(2), rename: sig(2), exists?: sig(1), stat: sig(1),
                     copy_from_host: sig(2), copy_to_host: sig(2), read_stream: sig(1), write_stream: sig(1)
                   })
    check_instance(ms::FsEntry, { path: sig, name: sig, type: sig, size: sig, mode: sig, modified: sig,
                                  file?: sig, directory?: sig, symlink?: sig })
    check_instance(ms::FsMetadata, { type: sig, size: sig, mode: sig, readonly?: sig, file?: sig, directory?: sig,
                                     symlink?: sig, modified: sig, created: sig })
    check_instance(ms::FsReadStream, { each: sig, read: sig })
    check_instance(ms::FsWriteSink, { write: sig(1), close: sig })

    entry = ms::FsEntry.new(name: "f", path: "/f", kind: :file, size: 1, mode: 0o644, modified: Time.at(0))
    expect([entry.type, entry.modified]).to eq([:file, Time.at(0)])
    meta = ms::FsMetadata.new(kind: :directory, size: 0, mode: 0o555, uid: 0, gid: 0, mtime: Time.at(1))
    expect([meta.type, meta.readonly?, meta.modified, meta.created]).to eq([:directory, true, Time.at(1), nil])
  end

  it "Metrics, MetricsStream, LogStream and LogEntry" do
    check_instance(ms::Metrics, {
                     cpu_percent: sig, vcpu_time_ns: sig, memory_bytes: sig, memory_available_bytes: sig,
                     memory_host_resident_bytes: sig, memory_limit_bytes: sig, disk_read_bytes: sig,
                     disk_write_bytes: sig, net_rx_bytes: sig, net_tx_bytes: sig, upper_used_bytes: sig,
                     upper_free_bytes: sig, upper_host_allocated_bytes: sig, uptime_secs: sig, timestamp: sig
                   })
    check_instance(ms::MetricsStream, { each: sig })
    check_instance(ms::LogStream, { each: sig })
    check_instance(ms::LogEntry, { source: sig, session_id: sig, cursor: sig, data: sig, text: sig, timestamp: sig })

    m = ms::Metrics.new(ms::Metrics::FIELDS.to_h { |f| [f.to_s, 1] }.merge("timestamp_ms" => 1_700_000_000_000))
    expect(m.timestamp).to eq(Time.at(1_700_000_000))
    e = ms::LogEntry.new("source" => "stdout", "text" => "hi", "data" => ["hi"].pack("m0"), "session_id" => 3,
                         "timestamp_ms" => 5, "cursor" => "v1.0.5.1")
    expect([e.source, e.session_id, e.cursor, e.data, e.text]).to eq([:stdout, 3, "v1.0.5.1", "hi".b, "hi"])
  end

  it "Patch: every factory with the reference's arguments, returning Hashes" do
    check_singleton(ms::Patch, {
                      text: sig(2, 0, :mode, :replace), file: sig(2, 0, :mode, :replace), append: sig(2),
                      copy_file: sig(2, 0, :mode, :replace), copy_dir: sig(2, 0, :replace),
                      symlink: sig(2, 0, :replace), mkdir: sig(1, 0, :mode), remove: sig(1)
                    })
    made = [ms::Patch.text("/a", "x", replace: true), ms::Patch.file("/a", "x"), ms::Patch.append("/a", "x"),
            ms::Patch.copy_file("/etc/hostname", "/a"), ms::Patch.copy_dir("/etc", "/a"),
            ms::Patch.symlink("/t", "/a"), ms::Patch.mkdir("/a"), ms::Patch.remove("/a")]
    expect(made).to all(be_a(Hash))
    expect(made.map { |h| h["kind"] }).to eq(%w[text file append copy_file copy_dir symlink mkdir remove])
    expect(made.first["path"]).to eq("/a")
  end

  it "Microsandbox module: constants and runtime methods" do
    expect(ms::VERSION).to be_a(String)
    expect(ms::RUNTIME_VERSION).to be_a(String).and(start_with("v"))
    expect(ms::SandboxInfo).to equal(ms::SandboxHandle)
    check_singleton(ms, {
                      version: sig, runtime_version: sig, install: sig, installed?: sig, ensure_runtime!: sig,
                      setup: sig(0, 0, :base_dir, :version, :force, :skip_verify), runtime_path: sig,
                      "runtime_path=": sig(1), "libkrunfw_path=": sig(1), all_sandbox_metrics: sig,
                      set_default_backend: sig(1, 0, :url, :api_key, :profile),
                      with_backend: sig(1, 0, :url, :api_key, :profile), default_backend_kind: sig
                    })
    expect(ms.runtime_version).to eq(ms::RUNTIME_VERSION)
    expect(ms.default_backend_kind).to eq(:local)
    expect(ms.with_backend(:local) { 42 }).to eq(42)
  end

  it "Image, ImageInfo, ImageDetail and ImagePruneReport" do
    expect(ms::Image).to be_an_instance_of(Class) # a class of class methods, as in the reference
    expect(ms::Image.inspect).to eq("Microsandbox::Image") # inspect without a reference is Class#inspect
    check_singleton(ms::Image, { list: sig, get: sig(1), inspect: sig(0, 1), remove: sig(1, 0, :force), prune: sig })
    check_instance(ms::ImageInfo, %i[reference size_bytes manifest_digest architecture os layer_count created_at
                                     last_used_at].to_h { |m| [m, sig] })
    check_instance(ms::ImageDetail, %i[handle config layers].to_h { |m| [m, sig] })
    check_instance(ms::ImagePruneReport, %i[image_refs_removed manifests_removed layers_removed fsmeta_removed
                                            vmdk_removed bytes_reclaimed].to_h { |m| [m, sig] })

    summary = { "reference" => "docker.io/library/alpine:3", "manifest_digest" => "sha256:#{'a' * 64}",
                "platform" => "linux/amd64", "pulled_at" => 1_700_000_100, "content_bytes" => 42, "root_disk_bytes" => 0,
                "in_use_by" => [], "size_bytes" => 42, "architecture" => "amd64", "os" => "linux", "layer_count" => 3,
                "created_at_ms" => 1_700_000_000_250, "last_used_at_ms" => nil }
    info = ms::ImageInfo.new(summary)
    expect([info.size_bytes, info.architecture, info.os, info.layer_count]).to eq([42, "amd64", "linux", 3])
    expect(info.created_at).to eq(Time.at(1_700_000_000, 250, :millisecond))
    expect(info.last_used_at).to be_nil
    expect(ms::ImageInfo.new(summary.merge("last_used_at_ms" => 1_700_000_200_001)).last_used_at.to_r)
      .to eq(Rational(1_700_000_200_001, 1000))
    # A record from before created_at existed reports its pull time.
    expect(ms::ImageInfo.new(summary.merge("created_at_ms" => nil)).created_at).to eq(Time.at(1_700_000_100))
    detail = ms::ImageDetail.new("summary" => summary, "config" => {}, "layers" => [], "config_digest" => "sha256:c")
    expect(detail).to be_a(ms::ImageInfo)
    expect(detail.handle).to be_an_instance_of(ms::ImageInfo)
    expect(detail.handle).to have_attributes(reference: info.reference, layer_count: 3, created_at: info.created_at)
  end

  it "coerce_write_bytes: a String (or #to_str) passes unchanged, anything else is TypeError" do
    s = +"bytes\xFF".b
    expect(ms.coerce_write_bytes(s)).to equal(s)
    path = Object.new.tap { |o| o.define_singleton_method(:to_str) { "converted" } }
    expect(ms.coerce_write_bytes(path)).to eq("converted")
    [nil, 42, :sym, ["a"], StringIO.new("io")].each do |bad|
      expect { ms.coerce_write_bytes(bad) }.to raise_error(TypeError, /must be a String \(got #{bad.class}\)/)
    end
    # The writes of FS, ExecStdin and FsWriteSink share it: checked before anything is sent.
    fs = ms::FS.allocate
    expect { fs.write("/x", 42) }.to raise_error(TypeError, /got Integer/)
  end

  it "SandboxHandle reports :draining from a running record with an active drain, :paused after a pause" do
    record = { "name" => "box", "status" => "running", "labels" => {}, "detached" => false, "created_at" => 1,
               "updated_at" => 2, "config" => "{}", "last_stop" => nil }
    expect(ms::SandboxHandle.new(record).status).to eq(:running)
    h = ms::SandboxHandle.new(record.merge("draining" => true))
    expect([h.status, h.running?, h.draining?, h.stopped?]).to eq([:draining, true, true, false])
    expect(ms::SandboxHandle::STATUSES).to include(h.status)
    # A stopped record never drains, whatever a leftover marker said.
    stop = { "status" => "stopped", "source" => "stop", "observed_at_ms" => 5, "exit_code" => 0, "signal" => nil }
    stopped = record.merge("status" => "stopped", "draining" => true, "last_stop" => stop)
    expect(ms::SandboxHandle.new(stopped).status).to eq(:stopped)
    # How the run ended decides between :stopped, :paused and :crashed.
    paused = ms::SandboxHandle.new(stopped.merge("last_stop" => stop.merge("source" => "pause")))
    expect([paused.status, paused.paused?, paused.stopped?, paused.running?]).to eq([:paused, true, true, false])
    crashed = ms::SandboxHandle.new(stopped.merge("last_stop" => stop.merge("status" => "crashed", "source" => "vm-exited")))
    expect([crashed.status, crashed.crashed?, crashed.stopped?]).to eq([:crashed, true, true])
  end

  it "every error class of the reference, with its code, as a class and an instance method" do
    codes = {
      Error: "microsandbox-error", InvalidConfigError: "invalid-config", SandboxNotFoundError: "sandbox-not-found",
      SandboxNotRunningError: "sandbox-not-running", SandboxAlreadyExistsError: "sandbox-already-exists",
      SandboxStillRunningError: "sandbox-still-running", ExecTimeoutError: "exec-timeout",
      ExecFailedError: "exec-failed", FilesystemError: "filesystem-error", PathNotFoundError: "path-not-found",
      VolumeNotFoundError: "volume-not-found", VolumeAlreadyExistsError: "volume-already-exists",
      ImageNotFoundError: "image-not-found", ImageInUseError: "image-in-use", ImagePullFailedError: "image-pull-failed",
      SnapshotNotFoundError: "snapshot-not-found", SnapshotAlreadyExistsError: "snapshot-already-exists",
      SnapshotSandboxRunningError: "snapshot-sandbox-running", SnapshotImageMissingError: "snapshot-image-missing",
      SnapshotIntegrityError: "snapshot-integrity", NetworkPolicyError: "network-policy-error",
      SecretViolationError: "secret-violation", TlsError: "tls-error", IoError: "io-error",
      MetricsDisabledError: "metrics-disabled", MetricsUnavailableError: "metrics-unavailable",
      UnsupportedOperationError: "unsupported-operation", CloudHttpError: "cloud-http", UnsupportedError: "unsupported"
    }
    codes.each do |name, code|
      expect(ms.const_defined?(name, false)).to be(true), "Microsandbox::#{name} is missing"
      klass = ms.const_get(name)
      expect(klass).to be <= ms::Error
      expect(klass.code).to eq(code)
      expect(klass.new("x").code).to eq(code)
    end
    expect(ms::Error).to be < StandardError
  end

  it "Volume, VolumeInfo and VolumeFs" do
    check_singleton(ms::Volume, { create: sig(1, 0, :kind, :size_mib, :quota_mib, :labels), get: sig(1), list: sig,
                                  remove: sig(1), fs: sig(1) })
    check_instance(ms::VolumeInfo, %i[name path kind quota_mib used_bytes capacity_bytes disk_format disk_fstype
                                      labels created_at fs].to_h { |m| [m, sig] })
    check_instance(ms::VolumeFs, { read: sig(1), read_text: sig(1), write: sig(2), list: sig(1), mkdir: sig(1),
                                   remove_file: sig(1), remove_dir: sig(1), exists?: sig(1), copy: sig(2),
                                   rename: sig(2), stat: sig(1) })
  end

  it "Snapshot, SnapshotInfo and SnapshotVerifyReport" do
    check_singleton(ms::Snapshot, { create: sig(1, 0, :name, :path, :labels, :force, :record_integrity), open: sig(1),
                                    get: sig(1), list: sig, list_dir: sig(1), reindex: sig(0, 1), remove: sig(1, 0, :force),
                                    verify: sig(1), export: sig(2, 0, :with_parents, :with_image, :plain_tar),
                                    import: sig(1, 0, :dest) })
    check_instance(ms::SnapshotInfo, %i[digest path name parent_digest image_ref image_manifest_digest fstype
                                        source_sandbox labels size_bytes format created_at open].to_h { |m| [m, sig] })
    check_instance(ms::SnapshotInfo, { remove: sig(0, 0, :force) })
    check_instance(ms::SnapshotVerifyReport, %i[digest path status algorithm content_digest verified?
                                                not_recorded?].to_h { |m| [m, sig] })
    check_instance(ms::SandboxHandle, { snapshot: sig(1), snapshot_to: sig(1) })
  end

  it "Sandbox class methods, SandboxHandle and SandboxStopResult" do
    check_singleton(ms::Sandbox, { start: sig(1, 0, :detached), get: sig(1), list: sig,
                                   list_with: sig(0, 0, :labels), remove: sig(1) })
    create_keys = %i[image cpus memory env workdir shell user hostname labels scripts entrypoint patches
                     oci_upper_size max_duration idle_timeout pull_policy registry_auth registry_insecure
                     registry_ca_certs detached replace replace_with_timeout secrets on_secret_violation tls
                     trust_host_cas volumes from_snapshot network dns ports ports_udp ipv4_pool ipv6_pool max_connections
                     rlimits log_level quiet_logs security ephemeral init fstype]
    accepts!(ms::Sandbox, :create, ms::Sandbox.method(:create), sig(1, 0, *create_keys))
    expect(ms::Sandbox::DISK_IMAGE_EXTENSIONS).to eq(%w[raw qcow2 vmdk])
    check_instance(ms::Sandbox, { stop: sig, stop_and_wait: sig, kill: sig, drain: sig, wait: sig, status: sig,
                                  owns_lifecycle?: sig, detach: sig })
    check_instance(ms::SandboxHandle, {
                     name: sig, status: sig, running?: sig, stopped?: sig, created_at: sig, updated_at: sig, stop: sig,
                     stop_with_timeout: sig(1), kill: sig, kill_with_timeout: sig(1), request_stop: sig,
                     request_kill: sig, request_drain: sig, wait_until_stopped: sig, config_json: sig, config: sig
                   })
    check_instance(ms::SandboxStopResult, { name: sig, status: sig, exit_code: sig, signal: sig, source: sig,
                                            stopped?: sig, crashed?: sig, observed_at: sig })
  end
end
