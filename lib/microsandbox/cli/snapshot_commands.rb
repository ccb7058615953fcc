# frozen_string_literal: true

module Microsandbox
  class CLI
    # `snapshot create | ls | inspect | rm | verify | export | import`, and `run
    # --from-snapshot`. A gem without snapshots ({Microsandbox::Snapshot}) refuses them
    # with `unsupported`.
    module SnapshotCommands
      private

      def cmd_snapshot(argv)
        sub = argv.shift
        case sub
        when "create" then snapshot_create(argv)
        when "ls", "list" then snapshot_ls(argv)
        when "inspect" then snapshot_inspect(argv)
        when "rm", "remove" then snapshot_rm(argv)
        when "verify" then snapshot_verify(argv)
        when "export" then snapshot_export(argv)
        when "import" then snapshot_import(argv)
        when "-h", "--help", nil
          @out.puts "usage: microsandbox snapshot create SANDBOX [--name N] | ls [--dir D] | inspect SNAP... | " \
                    "rm [-f] SNAP... | verify SNAP | export SNAP FILE | import FILE [--dest DIR]"
          sub.nil? ? EXIT_CODES[:usage] : EXIT_CODES[:ok]
        else raise UsageError, "unknown snapshot command #{sub.inspect} (create, ls, inspect, rm, verify, export, import)"
        end
      end

      def snapshot_create(argv)
        o = { labels: {} }
        parser("snapshot create [OPTIONS] SANDBOX") do |p|
          p.separator "Saves the root disk of a stopped sandbox; boot from it with `run --from-snapshot NAME`."
          p.separator ""
          p.on("--name NAME", "snapshot name (default: the sandbox's)") { |v| o[:name] = v }
          p.on("--path DIR", "write the artifact to DIR instead of the home") { |v| o[:path] = v }
          p.on("-l", "--label KEY=VAL", "label (repeatable)") { |v| add_pair(o[:labels], v, "--label") }
          p.on("-f", "--force", "replace an existing snapshot") { o[:force] = true }
        end.parse!(argv)
        expect_args!(argv, 1, 1, "snapshot create")
        info = snapshot_api.create(argv[0], **o)
        @json ? emit_json(snapshot_summary(info)) : @out.puts("#{info.name || info.path} #{info.digest}")
        EXIT_CODES[:ok]
      end

      def snapshot_ls(argv)
        dir = nil
        parser("snapshot ls [--dir DIR]") { |p| p.on("--dir DIR", "the artifacts in DIR instead of the home") { |v| dir = v } }
          .parse!(argv)
        expect_args!(argv, 0, 0, "snapshot ls")
        snaps = dir ? snapshot_api.list_dir(dir) : snapshot_api.list
        if @json
          emit_json(snaps.map { |s| snapshot_summary(s) })
        else
          table(%w[NAME DIGEST SIZE SOURCE CREATED],
                snaps.map do |s|
                  [s.name || s.path, s.digest.to_s[0, 19], human_bytes(s.size_bytes.to_i), s.source_sandbox || "-",
                   local_time(s.created_at)]
                end)
        end
        EXIT_CODES[:ok]
      end

      def snapshot_inspect(argv)
        parser("snapshot inspect SNAP...").parse!(argv)
        expect_args!(argv, 1, nil, "snapshot inspect")
        @out.puts JSON.pretty_generate(argv.map { |key| snapshot_summary(snapshot_api.get(key)) })
        EXIT_CODES[:ok]
      end

      def snapshot_rm(argv)
        force = false
        parser("snapshot rm [OPTIONS] SNAP...") do |p|
          p.on("-f", "--force", "also when sandboxes are built on it (they cannot start again)") { force = true }
        end.parse!(argv)
        expect_args!(argv, 1, nil, "snapshot rm")
        api = snapshot_api
        each_name(argv) { |key| api.remove(key, force: force) }
      end

      def snapshot_verify(argv)
        parser("snapshot verify SNAP") { |p| p.separator "Hashes the disk and compares it with the manifest (exit 125 when it does not match)." }
          .parse!(argv)
        expect_args!(argv, 1, 1, "snapshot verify")
        report = snapshot_api.verify(argv[0])
        doc = { "digest" => report.digest, "path" => report.path, "status" => report.status.to_s,
                "algorithm" => report.algorithm, "content_digest" => report.content_digest }
        @json ? emit_json(doc) : @out.puts("#{report.status} #{report.digest}")
        EXIT_CODES[:ok]
      end

      def snapshot_export(argv)
        parser("snapshot export SNAP FILE") { |p| p.separator "Writes the artifact as one tar file (checked first)." }.parse!(argv)
        expect_args!(argv, 2, 2, "snapshot export")
        snapshot_api.export(argv[0], argv[1])
        @json ? emit_json("exported" => File.expand_path(argv[1])) : @out.puts(File.expand_path(argv[1]))
        EXIT_CODES[:ok]
      end

      def snapshot_import(argv)
        dest = nil
        parser("snapshot import [--dest DIR] FILE") { |p| p.on("--dest DIR", "artifact directory") { |v| dest = v } }.parse!(argv)
        expect_args!(argv, 1, 1, "snapshot import")
        info = snapshot_api.import(argv[0], **{ dest: dest }.compact)
        @json ? emit_json(snapshot_summary(info)) : @out.puts("#{info.name || info.path} #{info.digest}")
        EXIT_CODES[:ok]
      end

      def snapshot_api
        return Microsandbox::Snapshot if Microsandbox.const_defined?(:Snapshot, false)

        raise UnsupportedError, "snapshots are not in this version of the gem"
      end

      def snapshot_summary(info)
        { "name" => info.name, "digest" => info.digest, "path" => info.path, "parent_digest" => info.parent_digest,
          "image_ref" => info.image_ref, "image_manifest_digest" => info.image_manifest_digest, "fstype" => info.fstype,
          "source_sandbox" => info.source_sandbox, "labels" => info.labels, "size_bytes" => info.size_bytes,
          "format" => info.format, "created_at" => iso_time(info.created_at) }
      end
    end
  end
end
