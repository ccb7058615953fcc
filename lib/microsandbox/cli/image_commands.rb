# frozen_string_literal: true

module Microsandbox
  class CLI
    # `pull` and `image ls | inspect | rm | prune`.
    module ImageCommands
      private

      def cmd_pull(argv)
        o = {}
        parser("pull [OPTIONS] REFERENCE") do |p|
          p.separator "Pulls an image into the store (always asks the registry) and prepares its root"
          p.separator "disk. Progress per layer on stderr; with --json, one JSON line per progress"
          p.separator "event ({\"event\":\"progress\",…}) then {\"event\":\"pulled\",…}."
          p.separator ""
          p.on("--pull POLICY", "always (default), if_missing or never") { |v| o[:pull_policy] = v }
          p.on("--insecure", "the registry speaks plain HTTP") { o[:registry_insecure] = true }
        end.parse!(argv)
        expect_args!(argv, 1, 1, "pull")
        session = Image.start_pull(argv[0], pull_policy: o.fetch(:pull_policy, "always"),
                                            registry_insecure: o[:registry_insecure] ? true : false)
        progress = @json ? nil : Progress.new(@err)
        session.each do |event|
          if progress
            progress.update(event)
          else
            emit_json("event" => "progress", "digest" => event.digest, "done" => event.done, "total" => event.total)
          end
        end
        progress&.finish
        result = session.wait
        if @json
          emit_json("event" => "pulled", "reference" => result[:reference], "manifest_digest" => result[:manifest_digest])
        else
          @out.puts "#{result[:reference]} #{result[:manifest_digest]}"
        end
        EXIT_CODES[:ok]
      end

      def cmd_image(argv)
        sub = argv.shift
        case sub
        when "ls", "list" then image_ls(argv)
        when "inspect" then image_inspect(argv)
        when "rm", "remove" then image_rm(argv)
        when "prune" then image_prune(argv)
        when "-h", "--help", nil
          @out.puts "usage: microsandbox image ls | inspect REF | rm [-f] REF... | prune"
          sub.nil? ? EXIT_CODES[:usage] : EXIT_CODES[:ok]
        else raise UsageError, "unknown image command #{sub.inspect} (ls, inspect, rm, prune)"
        end
      end

      def image_ls(argv)
        parser("image ls").parse!(argv)
        expect_args!(argv, 0, 0, "image ls")
        images = Image.list.sort_by(&:reference)
        if @json
          emit_json(images.map { |i| image_summary(i) })
        else
          table(%w[REFERENCE DIGEST SIZE PULLED USED-BY],
                images.map do |i|
                  [i.reference, i.manifest_digest.to_s[0, 19], human_bytes(i.content_bytes), local_time(i.pulled_at),
                   i.in_use_by.empty? ? "-" : i.in_use_by.join(",")]
                end)
        end
        EXIT_CODES[:ok]
      end

      def image_inspect(argv)
        parser("image inspect REFERENCE").parse!(argv)
        expect_args!(argv, 1, 1, "image inspect")
        detail = Image.inspect(argv[0])
        @out.puts JSON.pretty_generate(image_summary(detail).merge("config_digest" => detail.config_digest,
                                                                   "config" => detail.config, "layers" => detail.layers))
        EXIT_CODES[:ok]
      end

      def image_rm(argv)
        force = false
        parser("image rm [OPTIONS] REFERENCE...") do |p|
          p.on("-f", "--force", "remove even while a sandbox's root is built on it") { force = true }
        end.parse!(argv)
        expect_args!(argv, 1, nil, "image rm")
        each_name(argv) { |ref| Image.remove(ref, force: force) }
      end

      def image_prune(argv)
        parser("image prune") { |p| p.separator "Deletes blobs and root disks no stored image references." }.parse!(argv)
        expect_args!(argv, 0, 0, "image prune")
        report = Image.prune
        bytes = report.bytes_reclaimed
        @json ? emit_json(report.to_h.transform_keys(&:to_s)) : @out.puts("reclaimed #{human_bytes(bytes)}")
        EXIT_CODES[:ok]
      end

      def image_summary(info)
        { "reference" => info.reference, "manifest_digest" => info.manifest_digest, "platform" => info.platform,
          "pulled_at" => iso_time(info.pulled_at), "content_bytes" => info.content_bytes,
          "root_disk_bytes" => info.root_disk_bytes, "in_use_by" => info.in_use_by, "layer_count" => info.layer_count,
          "os" => info.os, "architecture" => info.architecture, "created_at" => iso_time(info.created_at),
          "last_used_at" => iso_time(info.last_used_at) }
      end
    end
  end
end
